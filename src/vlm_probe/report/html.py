"""A self-contained HTML report: the answer first, the claim table, then one section per analysis
(text, figures, tables), plotly.js inlined once. The file opens offline."""

from __future__ import annotations

import datetime as _dt
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_write_text

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1f2328;
       background: #f6f8fa; }
header { background: #24292f; color: white; padding: 24px 40px; }
header h1 { margin: 0 0 6px 0; font-size: 26px; }
header p { margin: 4px 0; opacity: 0.9; }
header a { color: #9ecbff; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 40px 80px 40px; }
section { background: white; border: 1px solid #d0d7de; border-radius: 8px; padding: 20px 24px; margin: 20px 0; }
section h2 { margin-top: 0; font-size: 20px; }
.answer { font-size: 16px; line-height: 1.5; }
.reading { background: #f6f8fa; border-left: 4px solid #57606a; padding: 8px 14px; margin: 12px 0; }
.sample { color: #57606a; font-size: 13px; margin: 4px 0; }
.skipped { background: #fff8c5; border-left: 4px solid #d4a72c; padding: 8px 14px; }
.failed { background: #ffebe9; border-left: 4px solid #cf222e; padding: 8px 14px; }
table { border-collapse: collapse; font-size: 13px; margin: 10px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; }
td:first-child, th:first-child { text-align: left; }
.claim { display: grid; grid-template-columns: 150px 1fr; gap: 12px; padding: 10px 0; border-top: 1px solid #eaeef2; }
.verdict { font-weight: 600; border-radius: 4px; padding: 4px 8px; text-align: center; height: fit-content; }
.supported { background: #dafbe1; color: #116329; }
.contradicted { background: #ffebe9; color: #a40e26; }
.no-difference-shown { background: #ddf4ff; color: #0550ae; }
.inconclusive { background: #fff8c5; color: #7d4e00; }
.no-signal, .not-tested { background: #eaeef2; color: #57606a; }
table.overview td, table.overview th { text-align: left; }
.lines { margin: 4px 0 0 0; padding-left: 18px; font-size: 13px; color: #424a53; }
nav a { margin-right: 14px; }
footer { color: #57606a; font-size: 12px; }
"""


def table_html(frame: pd.DataFrame, classes: str | None = None) -> str:
    """A table with its own columns only (no index, no stray column-name row)."""
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    frame.columns.name = None
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="", classes=classes)


@dataclass
class Claim:
    """A published claim, the verdict of this run, and its evidence (one line per line of evidence)."""

    text: str
    verdict: str
    evidence: str
    lines: list[tuple[str, str, str]] = field(default_factory=list)  #: (name, verdict, text)

    def html(self) -> str:
        cls = self.verdict.replace(" ", "-")
        if len(self.lines) > 1:
            body = "<ul class='lines'>" + "".join(
                f"<li><b>{html.escape(name)}</b> ({html.escape(verdict)}): {html.escape(text)}</li>"
                for name, verdict, text in self.lines) + "</ul>"
        else:
            body = f"<br>{html.escape(self.evidence)}"
        return (f'<div class="claim"><div class="verdict {cls}">{html.escape(self.verdict)}</div>'
                f"<div><b>{html.escape(self.text)}</b>{body}</div></div>")


@dataclass
class Section:
    """One analysis: status, sample sizes, a reading, figures, tables and notes."""

    id: str
    title: str
    status: str = "ran"
    reason: str = ""
    enable: str = ""
    samples: list[str] = field(default_factory=list)
    reading: str = ""
    figures: list[Any] = field(default_factory=list)
    tables: list[tuple[str, pd.DataFrame]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def html(self) -> str:
        parts = [f'<section id="{html.escape(self.id)}"><h2>{html.escape(self.title)}</h2>']
        if self.status == "skipped":
            parts.append(f'<p class="skipped">Skipped: {html.escape(self.reason)} To run it: '
                         f"{html.escape(self.enable)}.</p>")
        elif self.status == "failed":
            parts.append(f'<p class="failed">This analysis failed: {html.escape(self.reason)}</p>')
        for sample in self.samples:
            parts.append(f'<p class="sample">{html.escape(sample)}</p>')
        if self.reading:
            parts.append(f'<div class="reading">{html.escape(self.reading)}</div>')
        for fig in self.figures:
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}))
        for caption, table in self.tables:
            parts.append(f"<p><b>{html.escape(caption)}</b></p>")
            parts.append(table_html(table))
        for note in self.notes:
            parts.append(f"<p>{html.escape(note)}</p>")
        parts.append("</section>")
        return "\n".join(parts)


@dataclass
class Report:
    """Header, the answer, the claims, an overview of the sections, the sections; ``write(path)``."""

    title: str
    subtitle: str = ""
    header_lines: list[str] = field(default_factory=list)
    answer: list[str] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    overview: pd.DataFrame | None = None
    sections: list[Section] = field(default_factory=list)
    footer: str = ""

    def html(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = " ".join(f'<a href="#{html.escape(s.id)}">{html.escape(s.title)}</a>' for s in self.sections)
        answer = "".join(f"<p class='answer'>{html.escape(s)}</p>" for s in self.answer)
        claims = "".join(c.html() for c in self.claims) or "<p>No claims evaluated.</p>"
        overview = table_html(self.overview, "overview") if self.overview is not None else ""
        body = "\n".join(s.html() for s in self.sections)
        lines = "".join(f"<p>{line}</p>" for line in self.header_lines)  # already escaped by the caller
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<header><h1>{html.escape(self.title)}</h1><p>{html.escape(self.subtitle)}</p>{lines}</header>
<main>
<nav>{nav}</nav>
<section id="summary"><h2>What did RL change, and where?</h2>{answer}
<h3>The published claims on this run</h3>{claims}
<h3>What ran</h3>{overview}</section>
{body}
<footer>Generated by vlm_probe on {stamp}. {html.escape(self.footer)}</footer>
</main></body></html>
"""

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, self.html())
