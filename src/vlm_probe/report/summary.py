"""The answer first: two or three sentences on "what did RL change, and where?" for this run,
generated from the saved tables and the claim verdicts (a pure function of them)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..arch.regions import THIRDS, Cuts
from .claims import ClaimParameters, ClaimResult
from .estimators import paired_items

METRIC_NAMES = {"M_v2r": "vision-to-reasoning (M_v2r)", "M_vis": "perception (M_vis)",
                "M_rea": "text reasoning (M_rea)"}


def _verdict(claims: Sequence[ClaimResult], claim: str) -> str:
    return next((c.verdict.value for c in claims if c.id == claim), "not tested")


def gain_sentence(tables: Mapping[str, pd.DataFrame], params: ClaimParameters) -> str:
    """RL minus IN on each fine-grained metric (paired over items), or what is missing."""
    items = tables.get("transfer_items")
    if items is None or items.empty:
        freezing = tables.get("freezing")
        if freezing is not None and not freezing.empty:
            rl = freezing[freezing["variant"] == "RL"]
            parts = [f"{r.family} {100 * r.vs_IN:+.1f} points [{100 * r.vs_IN_low:+.1f}, {100 * r.vs_IN_high:+.1f}]"
                     for r in rl.itertuples()]
            return "RL changes held-out accuracy (the testbed's scorer) by " + "; ".join(parts) + "."
        return ("This run has no graded items, so it does not say what RL gained (add perception.jsonl, v2r.jsonl "
                "or text.jsonl to --data).")
    parts = []
    for metric in ("M_v2r", "M_vis", "M_rea"):
        part = items[items["metric"] == metric]
        if part.empty or not {"IN", "RL"} <= set(part["variant"]):
            continue
        est = paired_items(part, "IN", "RL", n_resamples=params.n_resamples, level=params.level, seed=params.seed)
        parts.append(f"{METRIC_NAMES[metric]} by {est.value:+.1f} points [{est.low:+.1f}, {est.high:+.1f}] "
                     f"(n={est.n})")
    if not parts:
        return "The transfer table scored no variant pair IN/RL, so this run does not say what RL gained."
    return "RL changes " + "; ".join(parts) + " (RL minus IN, paired over items, 95% intervals)."


def _window(increments: np.ndarray, share: float = 0.5) -> tuple[int, int]:
    """The shortest run of consecutive layers whose increments add up to ``share`` of the total
    (the largest such sum when several are as short)."""
    total = float(increments.sum())
    best: tuple[int, int, float] | None = None
    n = len(increments)
    for length in range(1, n + 1):
        for start in range(0, n - length + 1):
            value = float(increments[start : start + length].sum())
            if value >= share * total and (best is None or value > best[2]):
                best = (start, start + length - 1, value)
        if best is not None:
            return best[0], best[1]
    return 0, n - 1


def where_sentence(tables: Mapping[str, pd.DataFrame], claims: Sequence[ClaimResult], cuts: Cuts | None) -> str:
    """Where in depth RL's output difference arises (cross-checkpoint patching), and where its
    weight update lies."""
    restored = tables.get("cross_patching_restored")
    parts = []
    if restored is not None and not restored.empty:
        into = restored[(restored["receiver"] == "IN") & (restored["donor"] == "RL")].sort_values("layer")
        values = into["restored"].to_numpy(dtype=float)
        if len(values) and np.isfinite(values).all() and values[-1] > 0:
            increments = np.diff(np.concatenate([[0.0], values]))
            i, j = _window(increments)
            span = f"layer L{i + 1}" if i == j else f"layers L{i + 1}-L{j + 1}"
            row = into.iloc[j]
            after = (f"patching RL's residual stream into IN after L{j + 1} restores {100 * row['restored']:.0f}% "
                     f"[{100 * row['low']:.0f}, {100 * row['high']:.0f}] of the difference")
            if i > 0:
                after += f", after L{i} {100 * values[i - 1]:.0f}%"
            parts.append(f"most of the RL-vs-IN output difference arises in decoder {span}: {after}")
    tensors = tables.get("weights_tensors")
    if tensors is not None and not tensors.empty:
        llm = tensors[(tensors["step"] == "IN->RL") & tensors["region"].isin(THIRDS)]
        total = float(llm["energy"].sum())
        if total > 0:
            ml = llm[llm["region"].isin(["mid", "late"])]
            span = f" (L{cuts.mid + 1}-L{cuts.n_layers})" if cuts is not None else ""
            energy, params = ml["energy"].sum() / total, ml["numel"].sum() / llm["numel"].sum()
            parts.append(f"RL's weight update puts {100 * energy:.0f}% of its decoder energy in the mid and late "
                         f"layers{span}, which hold {100 * params:.0f}% of the decoder's parameters")
    if not parts:
        return "This run has neither weight deltas nor cross-checkpoint patching, so it does not say where RL acts."
    text = "; ".join(parts)
    return f"{text[0].upper()}{text[1:]} (claim \"changes concentrate in mid-to-late layers\": " \
           f"{_verdict(claims, 'mid_late')})."


def image_sentence(tables: Mapping[str, pd.DataFrame], claims: Sequence[ClaimResult]) -> str | None:
    """How RL's use of the image changed: attention on it and the swap transition layer."""
    parts = []
    attention = next((c for c in claims if c.id == "attention"), None)
    if attention is not None and attention.lines and "difference" in attention.lines[0].numbers:
        n = attention.lines[0].numbers
        parts.append(f"RL's generated tokens put {n['difference']:+.4f} [{n['difference_low']:+.4f}, "
                     f"{n['difference_high']:+.4f}] attention on the image in the mid and late layers relative to IN "
                     f"({attention.verdict.value})")
    perception = next((c for c in claims if c.id == "perception"), None)
    if perception is not None and perception.verdict.value == "no signal":
        parts.append("the vision-token swap changes too few answers to locate where the image is read (no signal)")
    elif perception is not None and perception.lines and "a" in perception.lines[0].numbers:
        n = perception.lines[0].numbers
        moved = "stays at" if n["a"] == n["b"] else f"moves from L{n['a'] + 1} to"
        margin = n.get("margin_layers")
        within = f"; equivalence margin +-{margin} layer(s)" if margin is not None and n["a"] != n["b"] else ""
        parts.append(f"the vision-token swap transition {moved} L{n['b'] + 1} (\"where the image is read is "
                     f"unchanged\": {perception.verdict.value}{within})")
    if not parts:
        return None
    text = "; ".join(parts)
    return f"{text[0].upper()}{text[1:]}."


def answer_first(tables: Mapping[str, pd.DataFrame], claims: Sequence[ClaimResult], cuts: Cuts | None,
                 params: ClaimParameters = ClaimParameters()) -> list[str]:
    """The two or three sentences above the claim table."""
    sentences = [gain_sentence(tables, params), where_sentence(tables, claims, cuts)]
    image = image_sentence(tables, claims)
    return sentences + ([image] if image else [])
