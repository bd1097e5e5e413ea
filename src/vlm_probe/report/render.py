"""Drawing the report from a finished run: ``run.json``, the saved tables and figures.

``render(out)`` reads what the pipeline wrote and writes ``out/report.html``; it never runs a
model and never judges a claim (the verdicts come from ``run.json``, which the pipeline
computed from the same tables). Every reading is a sentence computed from the tables.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from ..arch import unified_index_label as label
from ..errors import InputError
from .figures import (
    as_figure,
    band_figure,
    bars_with_ci,
    bootstrap_by_layer,
    color,
    finish,
    spectra_figure,
)
from .html import Claim, Report, Section

PAPER = ("Xirui Li, Ming Li and Tianyi Zhou, \"What does RL improve for Visual Reasoning? A Frankenstein-Style "
         "Analysis\", arXiv:2602.12395 (2026)")
PAPER_URL = "https://arxiv.org/abs/2602.12395"
DEFINITIONS = ("M_vis: share of general VQA items answered correctly with the image and wrongly with a blank image "
               "(the answer needed the image). M_v2r: share of math VQA items answered correctly both with the image "
               "and with a blank image plus a text description of it (vision-to-reasoning). M_rea: accuracy on "
               "text-only reasoning items. Each is a percentage of its items with a 95% bootstrap interval.")


def _ci(value: float, low: float, high: float, fmt: str = ".1f") -> str:
    return f"{value:{fmt}} [{low:{fmt}}, {high:{fmt}}]"


def _range(low: int, high: int) -> str:
    return label(low) if low == high else f"{label(low)}-{label(high)}"


class Tables(dict):
    """The run's tables by name, read on demand from ``out/<name>.parquet``."""

    def __init__(self, out: Path, names: list[str]) -> None:
        super().__init__()
        self.out, self.names = out, set(names)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        if name not in self and name in self.names:
            self[name] = pd.read_parquet(self.out / f"{name}.parquet")
        return super().get(name, default)


def _cut_lines(fig: go.Figure, run: dict[str, Any]) -> None:
    cuts = run.get("cuts") or {}
    for x, text in ((cuts.get("mid", 0) + 0.5, "mid"), (cuts.get("late", 0) + 0.5, "late")):
        if x > 0.5:
            fig.add_vline(x=x, line={"dash": "dot", "color": "grey", "width": 1}, annotation_text=f"{text} starts",
                          annotation_font={"size": 10, "color": "grey"})


# ----------------------------------------------------------------------------- sections


def weights_section(t: Tables, run: dict[str, Any], s: Section) -> None:
    by_layer = t.get("weights_by_layer")
    layers = by_layer[by_layer["layer"].notna()].assign(layer=lambda f: f["layer"].astype(int))
    rel = band_figure(layers, y="rel_norm", low=None, high=None, series="step", x="layer",
                      title="Relative size of each update per layer (exact: every tensor, no sampling)",
                      y_title="relative update norm ||W_after - W_before|| / ||W_before||")
    _cut_lines(rel, run)
    rank = band_figure(layers[layers["stable_rank_mean"].notna()], y="stable_rank_mean", low=None, high=None,
                       series="step", x="layer", title="Stable rank of each update per layer",
                       y_title="stable rank ||dW||_F^2 / s_1^2 (mean over tensors)")
    regions = t.get("weights_by_region")
    shares = go.Figure()
    for i, (step, part) in enumerate(regions.groupby("step", sort=False)):
        shares.add_bar(name=step, x=part["region"], y=100 * part["energy_share"], marker={"color": color(i)})
    shares.update_xaxes(title_text="region (early / mid / late: decoder thirds)")
    shares.update_yaxes(title_text="% of the step's squared update norm")
    finish(shares.update_layout(barmode="group"), title="Where each update's energy lies, by region")
    s.figures += [rel, shares, rank]
    spectra = t.get("weights_spectra")
    if spectra is not None and not spectra.empty:
        s.figures.append(spectra_figure(spectra))
    table = regions[["step", "region", "n_tensors", "energy_share", "rel_norm"]].assign(
        energy_share=lambda f: (100 * f["energy_share"]).round(1))
    s.tables.append(("Energy share (% of the step's squared update norm) and relative norm by region",
                     table.rename(columns={"energy_share": "energy share (%)", "rel_norm": "relative norm",
                                           "n_tensors": "tensors"})))
    tensors = t.get("weights_tensors")
    llm = tensors[tensors["region"].isin(["early", "mid", "late"])]
    rl = llm[llm["step"] == "IN->RL"]
    if rl["energy"].sum() > 0:
        ml = rl[rl["region"].isin(["mid", "late"])]
        s.reading = (f"RL's update puts {100 * ml['energy'].sum() / rl['energy'].sum():.0f}% of its decoder energy "
                     f"(squared delta norm) in the mid and late layers, which hold "
                     f"{100 * ml['numel'].sum() / rl['numel'].sum():.0f}% of the decoder's parameters.")
        sft = llm[llm["step"] == "Base->IN"]
        if sft["energy"].sum() > 0:
            ratio = rl["energy"].sum() / sft["energy"].sum()
            sft_ml = sft[sft["region"].isin(["mid", "late"])]["energy"].sum() / sft["energy"].sum()
            s.reading += (f" The supervised update (Base->IN) puts {100 * sft_ml:.0f}% there; RL's decoder update has "
                          f"{ratio:.2g}x its energy.")


def swap_section(t: Tables, run: dict[str, Any], s: Section) -> None:
    from ..analyses import SwapResult
    from .estimators import transition_difference

    rates = t.get("swap_rates")
    s.figures.append(band_figure(rates, y="changed", low="changed_low", high="changed_high", series="model",
                                 title="Vision-token swap: answers changed when the swap starts at layer L",
                                 y_title="share of pairs whose answer changed", y_range=(-0.02, 1.02)))
    a, b = t.get("swap_IN"), t.get("swap_RL")
    rows = []
    for name, frame in (("IN", a), ("RL", b)):
        own = SwapResult(frame).transition_layer(n_resamples=500)
        rows.append({"checkpoint": name, "transition layer": label(own["unified_layer"]),
                     "95% range (own bootstrap)": _range(own["low"] + 1, own["high"] + 1),
                     "change-rate drop there": round(own["drop"], 3),
                     "change rate, swap from L1": round(float(frame[frame["layer"] == frame["layer"].min()]
                                                              ["changed"].mean()), 3)})
    s.tables.append(("Transition layers (unified index, as on the figure's axis)", pd.DataFrame(rows)))
    params = run.get("options", {}).get("claims", {})
    d = transition_difference(a, b, n_resamples=params.get("n_resamples", 2000), seed=params.get("seed", 0))
    s.reading = (f"A swap changes {100 * rows[0]['change rate, swap from L1']:.0f}% of IN's answers and "
                 f"{100 * rows[1]['change rate, swap from L1']:.0f}% of RL's when it starts at the first layer. "
                 f"The change rate drops most at {rows[0]['transition layer']} (IN) and {rows[1]['transition layer']} "
                 f"(RL); RL minus IN: {d.difference.value:+.0f} layers [{d.difference.low:+.0f}, "
                 f"{d.difference.high:+.0f}] (paired over {d.difference.n} pairs).")


def ablation_section(t: Tables, run: dict[str, Any], s: Section) -> None:
    table = t.get("ablation")
    baselines = {m: (float(p["baseline"].iloc[0]), float(p["baseline_low"].iloc[0]), float(p["baseline_high"].iloc[0]))
                 for m, p in table.groupby("model", sort=False)}
    s.figures.append(band_figure(table, y="value", low="low", high="high", series="model", baselines=baselines,
                                 title="Accuracy with one decoder layer skipped (dashed: no layer skipped)",
                                 y_title="accuracy with the layer skipped", y_range=(-0.02, 1.02)))
    shown = table.assign(layer=table["unified_layer"].map(label),
                         accuracy=[_ci(v, lo, hi, ".3f") for v, lo, hi in
                                   zip(table["value"], table["low"], table["high"])],
                         change=[_ci(100 * v, 100 * lo, 100 * hi) for v, lo, hi in
                                 zip(table["change"], table["change_low"], table["change_high"])])
    s.tables.append(("Accuracy with each layer skipped, and its change against no skipping (points, paired)",
                     shown[["model", "layer", "accuracy", "change", "n"]]))
    parts = []
    for model, part in table.groupby("model", sort=False):
        worst, best = part.loc[part["change"].idxmin()], part.loc[part["change"].idxmax()]
        text = (f"{model} (no layer skipped: {baselines[model][0]:.2f}): skipping {label(int(worst.unified_layer))} "
                f"costs the most ({100 * worst.change:+.0f} points [{100 * worst.change_low:+.0f}, "
                f"{100 * worst.change_high:+.0f}])")
        raised = part[part["change_low"] > 0]
        if len(raised):
            text += "; skipping " + ", ".join(label(int(v)) for v in raised["unified_layer"]) + " raises it"
        elif best.change > 0:
            text += f"; skipping {label(int(best.unified_layer))} raises it most ({100 * best.change:+.0f} points)"
        parts.append(text)
    s.reading = "; ".join(parts) + "."


def cross_patching_section(t: Tables, run: dict[str, Any], s: Section, claims: list[dict[str, Any]]) -> None:
    restored = t.get("cross_patching_restored")
    s.figures.append(band_figure(restored, y="restored", low="low", high="high", series="direction",
                                 title="Cross-checkpoint patching: the donor's residual stream patched in after "
                                 "layer L",
                                 y_title="share of the output difference restored (1 - mean KL after / before)",
                                 band_label="95% CI over prompts"))
    into = restored[restored["direction"] == "RL -> IN"]
    s.tables.append(("RL's residual stream patched into IN after each layer: share of the output difference restored "
                     "(ratio of means over prompts) and what each layer adds",
                     pd.DataFrame({"layer": into["unified_layer"].map(label),
                                   "restored": [_ci(v, lo, hi, ".3f") for v, lo, hi in
                                                zip(into["restored"], into["low"], into["high"])],
                                   "added by this layer": into["increment"].round(3), "prompts": into["n"]})))
    claim = next((c for c in claims if c["id"] == "mid_late"), None)
    line = next((x for x in (claim or {}).get("lines", []) if x["name"] == "patching"), None)
    s.reading = line["text"] if line else ""


def attention_section(t: Tables, run: dict[str, Any], s: Section, claims: list[dict[str, Any]], out: Path) -> None:
    frame = t.get("attention_mass")
    banded = bootstrap_by_layer(frame.groupby(["checkpoint", "sample", "unified_layer"], as_index=False)["mass"].mean(),
                                "mass", ["checkpoint"])
    s.figures.append(band_figure(banded, y="mass", low="low", high="high", series="checkpoint",
                                 title="Attention of generated tokens on the vision tokens",
                                 y_title="attention mass on vision tokens", band_label="95% CI over prompts"))
    diff = t.get("attention_mass_difference")
    fig = band_figure(diff.assign(series="RL minus IN"), y="difference", low="low", high="high", series="series",
                      title="Attention on the vision tokens: RL minus IN (paired over prompts)",
                      y_title="RL minus IN attention mass", band_label="95% CI")
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    _cut_lines(fig, run)
    s.figures.append(fig)
    for name in ("attention_overlay_IN", "attention_overlay_RL-IN"):
        path = out / "figures" / f"{name}.json"
        if path.is_file():
            s.figures.append(as_figure(path.read_text()))
    claim = next((c for c in claims if c["id"] == "attention"), None)
    s.reading = claim["evidence"] if claim else ""


def lens_section(t: Tables, run: dict[str, Any], s: Section) -> None:
    frame = t.get("logit_lens")
    banded = bootstrap_by_layer(frame, "kl_to_final", ["checkpoint", "readout"])
    banded["series"] = [f"{c} states, {r} readout" for c, r in zip(banded["checkpoint"], banded["readout"])]
    s.figures.append(band_figure(banded, y="kl_to_final", low="low", high="high", series="series",
                                 title="Logit lens: how far each layer's readout is from the final prediction",
                                 y_title="KL(final || readout at the layer), nats", band_label="95% CI over prompts"))
    own = banded[banded["checkpoint"] == banded["readout"]]
    last = own["unified_layer"].max()
    mid = (run.get("cuts") or {}).get("mid", 0) + 1
    at = own[own["unified_layer"] == mid].set_index("checkpoint")["kl_to_final"]
    s.reading = (f"At the start of the mid third ({label(mid)}) the lens is "
                 + ", ".join(f"{k} {v:.3g} nats" for k, v in at.items())
                 + f" from the final prediction; by {label(int(last))} it is the prediction. Crossed readouts "
                 "(one checkpoint's states read with the other's final norm and head) show how much of the "
                 "difference lies in the head.")


def drift_section(t: Tables, run: dict[str, Any], s: Section) -> None:
    drift = t.get("drift")
    s.figures.append(band_figure(drift, y="rel_norm", low=None, high=None, series="group",
                                 title="Representation drift: IN and RL on identical inputs, per token group",
                                 y_title="relative difference ||h_RL - h_IN|| / ||h_IN||"))
    vision = drift[drift["group"] == "vision"].sort_values("unified_layer")
    if len(vision):
        s.reading = (f"On the vision tokens the residual streams differ by {vision['rel_norm'].iloc[0]:.3f} of their "
                     f"norm after the first layer and {vision['rel_norm'].iloc[-1]:.3f} after the last.")
    probes = t.get("probes")
    if probes is not None and not probes.empty:
        scores = probes[(probes["cosine_to"] == "") & (probes["train"] == probes["eval"])]
        long = pd.concat([scores[["train", "seed", "unified_layer", "score"]].rename(columns={"train": "series"}),
                          scores.groupby(["seed", "unified_layer"], as_index=False)["control"].mean()
                          .rename(columns={"control": "score"}).assign(series="control task (both)")])
        banded = bootstrap_by_layer(long, "score", ["series"])
        n_seeds = scores["seed"].nunique()
        s.figures.append(band_figure(banded, y="score", low="low", high="high", series="series",
                                     title="Linear probe for the answer at the last prompt token",
                                     y_title="held-out accuracy of the probe",
                                     band_label=f"95% CI over {n_seeds} random splits", y_range=(-0.02, 1.02)))


def transfer_section(t: Tables, run: dict[str, Any], s: Section, claims: list[dict[str, Any]]) -> None:
    table = t.get("transfer_table")
    s.figures.append(bars_with_ci(table, x="variant", y="value", low="low", high="high", series="metric",
                                  title="Transfer table: IN, RL and the six block merges",
                                  x_title="variant (early:mid:late sources)", y_title="% of items"))
    cells = table.assign(cell=[_ci(v, lo, hi) for v, lo, hi in zip(table["value"], table["low"], table["high"])])
    wide = cells.pivot_table(index=["variant", "host"], columns="metric", values="cell", aggfunc="first", sort=False)
    wide = wide.reset_index()
    wide.columns.name = None
    s.tables.append(("Fine-grained metrics per variant, % of items [95% CI]; host: the checkpoint whose vision tower, "
                     "projector, embeddings and head the variant keeps", wide))
    s.notes.append(DEFINITIONS)
    acc = t.get("transfer_accuracies")
    if acc is not None and not acc.empty:
        rows = acc[acc["variant"].isin(["IN", "RL"])]
        rec = pd.DataFrame({"checkpoint": rows["variant"], "measure": rows["metric"].str.replace("accuracy:", ""),
                            "accuracy (%)": [_ci(100 * v, 100 * lo, 100 * hi) for v, lo, hi in
                                             zip(rows["value"], rows["low"], rows["high"])],
                            "n": rows["n"], "scorer": "harness grade()", "items": rows["population"]})
        freezing = t.get("freezing")
        if freezing is not None and not freezing.empty:
            f = freezing[freezing["variant"].isin(["IN", "RL"])]
            rec = pd.concat([rec, pd.DataFrame({
                "checkpoint": f["variant"], "measure": f["family"],
                "accuracy (%)": [_ci(100 * v, 100 * lo, 100 * hi) for v, lo, hi in
                                 zip(f["accuracy"], f["low"], f["high"])],
                "n": f["n"], "scorer": "testbed exact match",
                "items": "the testbed's held-out items (freezing table)"})])
        s.tables.append(("The accuracies behind the metrics, for IN and RL (reconciles the metrics with the held-out "
                         "accuracies of the same checkpoints: the image condition of general and math VQA is their "
                         "perception and v2r accuracy)", rec.sort_values(["checkpoint", "measure"])))
    claim = next((c for c in claims if c["id"] == "transfer"), None)
    s.reading = claim["evidence"] if claim else ""


def freezing_section(t: Tables, run: dict[str, Any], s: Section, claims: list[dict[str, Any]]) -> None:
    frame = t.get("freezing").copy()
    for col in ("accuracy", "low", "high"):
        frame[col] = 100 * frame[col]
    s.figures.append(bars_with_ci(frame, x="family", y="accuracy", low="low", high="high", series="variant",
                                  title="Held-out accuracy after RL with one block frozen",
                                  x_title="task family", y_title="% of held-out items correct"))
    cells = frame.assign(cell=[f"{a:.1f} (vs RL {_ci(100 * v, 100 * lo, 100 * hi)})" if var not in ("IN", "RL")
                               else f"{a:.1f}" for a, v, lo, hi, var in
                               zip(frame["accuracy"], frame["vs_RL"], frame["vs_RL_low"], frame["vs_RL_high"],
                                   frame["variant"])])
    wide = cells.pivot_table(index="variant", columns="family", values="cell", aggfunc="first", sort=False)
    wide = wide.reset_index()
    wide.columns.name = None
    s.tables.append(("Accuracy (%) per variant and family; frozen variants: difference to RL in points "
                     "[95% CI, paired]",
                     wide))
    claim = next((c for c in claims if c["id"] == "freezing"), None)
    s.reading = claim["evidence"] if claim else ""


RENDERERS = {"weights": weights_section, "swap": swap_section, "ablation": ablation_section,
             "cross_patching": cross_patching_section, "attention": attention_section, "lens": lens_section,
             "drift": drift_section, "transfer": transfer_section, "freezing": freezing_section}


# ----------------------------------------------------------------------------- the report


def _why(record: dict[str, Any]) -> str:
    enable = f" To run it: {record['enable']}." if record.get("enable") else ""
    return f"{record.get('reason', '')}{enable}".strip()


def build_report(out: str | Path) -> Report:
    """The :class:`Report` of a finished run in ``out`` (``run.json`` and the tables)."""
    out = Path(out)
    path = out / "run.json"
    if not path.is_file():
        raise InputError(f"{out} holds no run.json: not the output of `vlm-probe analyze`.")
    run = json.loads(path.read_text())
    tables = Tables(out, run.get("tables", []))
    claims = run.get("claims", [])
    sections = []
    for record in run.get("sections", []):
        section = Section(record["id"], record["title"], record["status"], record.get("reason", ""),
                          record.get("enable", ""), list(record.get("samples", [])),
                          notes=list(record.get("notes", [])))
        if record["status"] == "ran":
            renderer = RENDERERS[record["id"]]
            try:
                if record["id"] in ("cross_patching", "transfer", "freezing"):
                    renderer(tables, run, section, claims)
                elif record["id"] == "attention":
                    renderer(tables, run, section, claims, out)
                else:
                    renderer(tables, run, section)
            except Exception as error:  # a drawing error is shown, not hidden
                section.notes.append(f"This section could not be drawn: {type(error).__name__}: {error}")
        sections.append(section)
    model = run.get("model", {})
    header = [html.escape(model.get("description", "")),
              f'Claims from {html.escape(PAPER)} (<a href="{PAPER_URL}">{PAPER_URL}</a>).',
              html.escape(f"Data: {run.get('data_description', '')}")]
    overview = pd.DataFrame([{"section": r["title"], "status": r["status"],
                              "sample": "; ".join(r.get("samples", [])),
                              "time (s)": round(r.get("seconds", 0.0), 1),
                              "why not run / how to run it": _why(r)}
                             for r in run.get("sections", [])])
    return Report(
        title="vlm_probe: what did RL change, and where?",
        subtitle=f"{model.get('family', '?')}: IN vs RL",
        header_lines=[line for line in header if line],
        answer=list(run.get("summary", [])),
        claims=[Claim(c["text"], c["verdict"], c["evidence"], [(x["name"], x["verdict"], x["text"])
                                                               for x in c.get("lines", [])]) for c in claims],
        overview=overview,
        sections=sections,
        footer="Tables: *.parquet beside this file; provenance, options, margins and verdicts: run.json.",
    )


def render(out: str | Path) -> Path:
    """Write ``out/report.html`` from a finished run."""
    report = build_report(out)
    return report.write(Path(out) / "report.html")
