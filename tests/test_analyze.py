"""The main job end to end on the reduced testbed: every section has data, the report is
self-contained, and it renders in a real browser without console errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pandas as pd
import pytest

from vlm_probe.cli import main
from vlm_probe.report.analyze import SECTIONS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    mp = pytest.MonkeyPatch()
    mp.setenv("VLM_PROBE_CACHE", str(root / "cache"))
    try:
        code = main(["analyze", "--reduced", "--out", str(root / "out"), "--samples", "12", "--eval-items", "16",
                     "--max-new-tokens", "4", "-q"])
    finally:
        mp.undo()
    assert code == 0
    return root / "out"


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id"):
            self.ids.append(attrs["id"])
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if tag in ("script", "link", "img", "iframe") and re.match(r"(https?:)?//", value):
                self.external.append(value)


def test_every_section_has_data_and_the_report_is_self_contained(report) -> None:
    html = (report / "report.html").read_text()
    parser = _Sections()
    parser.feed(html)
    assert parser.ids == ["summary"] + [name for name, _, _ in SECTIONS]
    assert not parser.external, f"the report loads {parser.external}"
    assert "No data for this section" not in html and "This analysis failed" not in html
    assert html.count("Plotly.newPlot") >= len(SECTIONS)
    run = json.loads((report / "run.json").read_text())
    assert run["failures"] == {}
    assert {"torch", "transformers", "nnsight", "dtype", "attention", "checkpoints", "command"} <= set(run)
    assert len(run["claims"]) == 5
    assert {c["verdict"] for c in run["claims"]} <= {"supported", "not supported", "inconclusive"}
    for table in run["tables"]:
        assert len(pd.read_parquet(report / table)) > 0, table


def test_bad_arguments_fail_before_any_work(tmp_path, capsys) -> None:
    assert main(["analyze", "--in", str(tmp_path / "nope"), "--rl", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["analyze", "--in", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "both --in and --rl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_and_cuts_fail_before_any_work(tmp_path, zoo, capsys) -> None:
    qwen = str(zoo("qwen2_5_vl").save(tmp_path / "qwen"))
    wider = str(zoo("qwen2_5_vl", d_mlp=96).save(tmp_path / "wider"))
    llava = str(zoo("llava").save(tmp_path / "llava"))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    out = str(tmp_path / "out")
    cases = [
        (["--in", qwen, "--rl", llava], "LLaVA"),
        (["--in", qwen, "--rl", wider], "one architecture"),
        (["--in", str(unknown), "--rl", qwen], "register"),
        (["--in", qwen, "--rl", qwen, "--cuts", "9,x"], "two integers"),
        (["--in", qwen, "--rl", qwen, "--cuts", "1,99"], "non-empty parts"),
    ]
    for args, message in cases:
        assert main(["analyze", *args, "--out", out, "-q"]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "out").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian packages chromium, "
                    "chromium-driver; .ci/run installs them)")
def test_report_renders_in_headless_chromium(report, tmp_path) -> None:
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", (report / "report.html").as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    rendered = len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', proc.stdout))
    expected = (report / "report.html").read_text().count("Plotly.newPlot")
    assert rendered == expected > 0, f"{rendered} of {expected} figures rendered"
