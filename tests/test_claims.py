"""The claim logic on hand-made fact tables: every verdict of every claim, and the boundaries.

Constant per-item data make every bootstrap interval a point, so a boundary (an interval
exactly at the margin) is hit exactly; values are chosen to be exact in binary floating point.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vlm_probe.analyses import SwapResult
from vlm_probe.arch.regions import Cuts
from vlm_probe.errors import InputError
from vlm_probe.report.claims import (
    ClaimParameters,
    Verdict,
    claim_attention,
    claim_freezing,
    claim_mid_late,
    claim_perception,
    claim_transfer,
    combine,
    decide,
    decide_unchanged,
    judge,
)
from vlm_probe.report.estimators import restored_by_layer, transition_difference
from vlm_probe.stats import Estimate

S, C, N, I, X, T = (Verdict.SUPPORTED, Verdict.CONTRADICTED, Verdict.NO_DIFFERENCE, Verdict.INCONCLUSIVE,
                    Verdict.NO_SIGNAL, Verdict.NOT_TESTED)
P = ClaimParameters(n_resamples=400)
CUTS = Cuts.make((2, 5), 8)  # mid+late are 6 of 8 layers: a share of 0.75


def est(low: float, high: float, value: float | None = None) -> Estimate:
    return Estimate((low + high) / 2 if value is None else value, low, high, 8)


# ----------------------------------------------------------------------------- decision rules


@pytest.mark.parametrize("low, high, direction, expected", [
    (0.2, 0.4, 1, S), (-0.4, -0.2, 1, C), (-0.1, 0.1, 1, N), (-0.1, 0.3, 1, I),
    (-0.4, -0.2, -1, S), (0.2, 0.4, -1, C), (-0.3, 0.1, -1, I),
    (-0.1, -0.1, 1, N), (0.1, 0.1, 1, N), (-0.1, 0.1000001, 1, I),  # margin bounds are inside
    (0.1000001, 0.2, 1, S), (0.0, 0.3, 1, I),                          # a low bound at 0 is not above it
    (float("nan"), float("nan"), 1, X),
])
def test_decide(low, high, direction, expected) -> None:
    assert decide(est(low, high), 0.1, direction) is expected


@pytest.mark.parametrize("low, high, expected", [
    (-1, 1, S), (0, 0, S), (-1, 0, S), (2, 3, C), (-3, -2, C), (-1, 2, I), (1, 2, I), (1.5, 2, C),
    (float("nan"), 1, X),
])
def test_decide_unchanged(low, high, expected) -> None:
    assert decide_unchanged(est(low, high), 1) is expected


@pytest.mark.parametrize("verdicts, expected", [
    ([S, S], S), ([S, C], I), ([S, N], I), ([N, N], N), ([C], C), ([S, X], S), ([X, X], X), ([], T), ([T], T),
    ([X, T], X), ([I, S], I),
])
def test_combine(verdicts, expected) -> None:
    assert combine(verdicts) is expected
    assert combine(iter(verdicts)) is expected


# ----------------------------------------------------------------------------- claim 1: mid-to-late


def tensors(early: float, mid: float, late: float, numel: tuple[int, int, int] = (2, 1, 1)) -> pd.DataFrame:
    rows = [{"step": "IN->RL", "region": r, "energy": e, "numel": n}
            for r, e, n in zip(("early", "mid", "late"), (early, mid, late), numel)]
    rows += [{"step": "IN->RL", "region": "vision", "energy": 100.0, "numel": 5},     # outside the decoder
             {"step": "Base->IN", "region": "early", "energy": 100.0, "numel": 2}]  # another step
    return pd.DataFrame(rows)


def patching(values, corrupt=1.0, layer: int = CUTS.mid - 1) -> pd.DataFrame:
    rows = [{"receiver": "IN", "donor": "RL", "layer": layer, "sample": s, "value": v, "corrupt": corrupt}
            for s, v in enumerate(values)]
    rows += [{"receiver": "RL", "donor": "IN", "layer": layer, "sample": s, "value": 9.0, "corrupt": 9.0}
             for s in range(len(values))]  # the reverse direction is not this claim's
    return pd.DataFrame(rows)


# the mid+late parameter share is 0.5 with numel (2, 1, 1); margin 0.5 makes 1.5x exactly the bound
@pytest.mark.parametrize("energies, margin, expected", [
    ((1.0, 2.0, 2.0), 0.1, S),     # 80% of the energy in 50% of the parameters: 1.6x
    ((2.0, 0.5, 0.5), 0.1, C),     # 0.6x
    ((2.0, 1.0, 1.0), 0.1, N),     # 1.0x
    ((1.0, 1.5, 1.5), 0.5, N),     # 1.5x at a margin of 0.5: on the bound, inside
    ((1.0, 1.6, 1.6), 0.5, S),     # just outside
    ((0.0, 0.0, 0.0), 0.1, X),     # RL's decoder equals IN's
])
def test_mid_late_weights_line(energies, margin, expected) -> None:
    params = ClaimParameters(energy_margin=margin, n_resamples=50)
    result = claim_mid_late(tensors(*energies), None, None, params)
    assert result.verdict is expected and result.lines[0].name == "weights"


# share of the difference left after the early third (mid+late share of layers: 0.75)
@pytest.mark.parametrize("values, corrupt, margin, expected", [
    ([1.0] * 8, 1.0, 0.05, S),              # all of it arises in mid+late
    ([0.25] * 8, 1.0, 0.05, C),             # a quarter
    ([0.75] * 8, 1.0, 0.05, N),             # exactly their share of layers
    ([0.875] * 8, 1.0, 0.125, N),           # 0.875 - 0.75 = the margin: inside
    ([0.9375] * 8, 1.0, 0.125, S),          # outside
    ([0.0, 1.5] * 4, 1.0, 0.05, I),         # prompts disagree: a wide interval
    ([0.0] * 8, 0.0, 0.05, X),              # RL and IN give the same outputs
    ([0.0] * 8, 5e-7, 0.05, X),             # below min_output_kl
])
def test_mid_late_patching_line(values, corrupt, margin, expected) -> None:
    params = ClaimParameters(share_margin=margin, n_resamples=400)
    result = claim_mid_late(None, patching(values, corrupt), CUTS, params)
    assert result.verdict is expected, result.evidence


@pytest.mark.parametrize("energies, values, expected", [
    ((1.0, 2.0, 2.0), [1.0] * 8, S),
    ((2.0, 0.5, 0.5), [0.25] * 8, C),
    ((2.0, 1.0, 1.0), [0.75] * 8, N),
    ((1.0, 2.0, 2.0), [0.25] * 8, I),       # the two lines disagree
    ((1.0, 2.0, 2.0), [0.75] * 8, I),
    ((0.0, 0.0, 0.0), [0.0] * 8, X),        # RL = IN in both lines
])
def test_mid_late_claim_combines_both_lines(energies, values, expected) -> None:
    corrupt = 0.0 if expected is X else 1.0
    result = claim_mid_late(tensors(*energies), patching(values, corrupt), CUTS, P)
    assert result.verdict is expected
    assert [x.name for x in result.lines] == ["weights", "patching"]


def test_mid_late_not_tested_and_bad_tables() -> None:
    assert claim_mid_late(None, None, None, P).verdict is T
    with pytest.raises(InputError, match="end of the early third"):
        claim_mid_late(None, patching([1.0] * 8, layer=6), CUTS, P)
    with pytest.raises(InputError, match="lacks column"):
        claim_mid_late(tensors(1, 1, 1).drop(columns="numel"), None, None, P)


# ----------------------------------------------------------------------------- claim 2: attention


def attention(rl: list[float], base: float = 0.5, n: int = 8) -> pd.DataFrame:
    rows = []
    for s in range(n):
        for layer in range(CUTS.n_layers):
            for head in range(2):
                early = layer < CUTS.mid  # early layers must not count: give them a huge difference
                rows.append({"checkpoint": "IN", "sample": s, "layer": layer, "head": head, "mass": base})
                rows.append({"checkpoint": "RL", "sample": s, "layer": layer, "head": head,
                             "mass": 99.0 if early else rl[s % len(rl)]})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("rl, base, margin, expected", [
    ([0.75], 0.5, 0.1, S),
    ([0.25], 0.5, 0.1, C),
    ([0.5], 0.5, 0.1, N),
    ([0.625], 0.5, 0.25, N),            # RL - IN = 0.125 = 25% of IN's 0.5: on the bound
    ([0.6875], 0.5, 0.25, S),           # above it
    ([0.25, 0.75], 0.5, 0.1, I),        # prompts disagree
    ([0.0], 0.0, 0.1, X),               # no attention on the image at all
])
def test_attention_claim(rl, base, margin, expected) -> None:
    params = ClaimParameters(attention_margin=margin, n_resamples=400)
    result = claim_attention(attention(rl, base), CUTS, params)
    assert result.verdict is expected, result.evidence


def test_attention_not_tested_and_bad_tables() -> None:
    assert claim_attention(None, CUTS, P).verdict is T
    frame = attention([0.5])
    with pytest.raises(InputError, match="checkpoints IN and RL"):
        claim_attention(frame[frame["checkpoint"] == "IN"], CUTS, P)


# ----------------------------------------------------------------------------- claim 3: perception


def swap(transitions: list[int], n_layers: int = 10, rate: float = 1.0) -> pd.DataFrame:
    """Each pair's answer changes (with probability ``rate``, as a fraction of pairs) when the swap
    starts before its transition layer."""
    rows = []
    n = len(transitions)
    for s, t in enumerate(transitions):
        changes = s < round(rate * n)
        for layer in range(n_layers):
            rows.append({"sample": s, "layer": layer, "changed": bool(changes and layer < t)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("t_in, t_rl, rate, expected", [
    ([4] * 10, [4] * 10, 1.0, S),        # the same layer
    ([4] * 10, [5] * 10, 1.0, S),        # one layer apart: the margin (10% of 10 layers), inside
    ([4] * 10, [6] * 10, 1.0, C),        # two layers apart, the whole interval outside
    ([4] * 10, [4, 7] * 5, 1.0, I),      # RL's pairs split between two transitions
    ([4] * 10, [4] * 10, 0.0, X),        # the swap changes no answer
    ([4] * 10, [4] * 10, 0.05, X),       # one pair in 20 changes: drops of 5 points
])
def test_perception_claim(t_in, t_rl, rate, expected) -> None:
    n = len(t_in) if rate != 0.05 else 20
    t_in, t_rl = (t_in * 2, t_rl * 2) if n == 20 else (t_in, t_rl)
    result = claim_perception(swap(t_in, rate=rate), swap(t_rl, rate=rate), 10, P)
    assert result.verdict is expected, result.evidence


def test_perception_signal_boundary() -> None:
    a, b = swap([4] * 10, rate=0.5), swap([4] * 10, rate=0.5)  # drops of exactly 0.5
    assert claim_perception(a, b, 10, ClaimParameters(min_transition_drop=0.5, n_resamples=200)).verdict is not X
    assert claim_perception(a, b, 10, ClaimParameters(min_transition_drop=0.5001, n_resamples=200)).verdict is X


def test_perception_not_tested_and_unpaired_tables() -> None:
    assert claim_perception(None, None, 10, P).verdict is T
    with pytest.raises(InputError, match="same pairs"):
        claim_perception(swap([4] * 10), swap([4] * 9), 10, P)


def test_transition_rule_is_the_analyses_rule() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame([{"sample": s, "layer": k, "changed": bool(rng.random() < 1 - k / 8)}
                          for s in range(30) for k in range(8)])
    t = transition_difference(frame, frame, n_resamples=100)
    assert t.a == SwapResult(frame).transition_layer(n_resamples=10)["layer"]
    assert t.difference.low == t.difference.high == 0.0


# ----------------------------------------------------------------------------- claim 4: transfer


def items(**variants: list[float]) -> pd.DataFrame:
    rows = []
    for variant, values in variants.items():
        name = variant.replace("_", ":")
        for i, v in enumerate(values):
            rows.append({"variant": name, "host": name.split(":")[0], "metric": "M_v2r", "id": f"q{i}", "value": v})
            rows.append({"variant": name, "host": "?", "metric": "M_vis", "id": f"q{i}", "value": 1.0 - v})
    return pd.DataFrame(rows)


HALF = [1.0] * 4 + [0.0] * 4
@pytest.mark.parametrize("table, margin, expected", [
    (items(IN=[0.0] * 8, RL=[1.0] * 8, IN_RL_RL=[1.0] * 8, RL_IN_IN=[0.0] * 8), 5.0, S),
    (items(IN=HALF, RL=[1.0] * 8, IN_RL_RL=[0.0] * 8), 5.0, C),
    (items(IN=[0.0] * 8, RL=[1.0] * 8, IN_RL_RL=[0.0] * 8), 5.0, N),
    (items(IN=[0.0] * 8, RL=[1.0] * 8, IN_RL_RL=[0.125] * 8), 12.5, N),    # on the bound
    (items(IN=[0.0] * 8, RL=[1.0] * 8, IN_RL_RL=[0.25] * 8), 12.5, S),
    (items(IN=HALF, RL=[1.0] * 8, IN_RL_RL=[0.0, 1.0] * 4), 5.0, I),
    (items(IN=HALF, RL=HALF, IN_RL_RL=[1.0] * 8), 5.0, X),                  # RL does not beat IN
    (items(IN=HALF, RL=[0.0, 1.0] * 4, IN_RL_RL=[1.0] * 8), 5.0, I),        # RL's own gain is uncertain
])
def test_transfer_claim(table, margin, expected) -> None:
    params = ClaimParameters(accuracy_margin=margin, n_resamples=400)
    result = claim_transfer(table, params)
    assert result.verdict is expected, result.evidence
    if expected in (S, C, N, I) and result.lines[0].name == "transfer":
        assert "come from IN" in result.evidence


def test_transfer_not_tested_and_bad_tables() -> None:
    assert claim_transfer(None, P).verdict is T
    only_vis = items(IN=[0.0] * 8, RL=[1.0] * 8, IN_RL_RL=[1.0] * 8)
    assert claim_transfer(only_vis[only_vis["metric"] == "M_vis"], P).verdict is T
    with pytest.raises(InputError, match="IN:RL:RL"):
        claim_transfer(items(IN=[0.0] * 8, RL=[1.0] * 8), P)


# ----------------------------------------------------------------------------- claim 5: freezing


def freezing(gain: tuple[float, float, float], **frozen: tuple[float, float, float]) -> pd.DataFrame:
    rows = [{"variant": "IN", "family": "v2r", "n": 8, "vs_IN": 0, "vs_IN_low": 0, "vs_IN_high": 0,
             "vs_RL": -gain[0], "vs_RL_low": -gain[2], "vs_RL_high": -gain[1]},
            {"variant": "RL", "family": "v2r", "n": 8, "vs_IN": gain[0], "vs_IN_low": gain[1],
             "vs_IN_high": gain[2], "vs_RL": 0, "vs_RL_low": 0, "vs_RL_high": 0},
            {"variant": "RL", "family": "text", "n": 8, "vs_IN": -1, "vs_IN_low": -1, "vs_IN_high": -1,
             "vs_RL": 0, "vs_RL_low": 0, "vs_RL_high": 0}]
    for name, (v, lo, hi) in frozen.items():
        rows.append({"variant": f"RL-frozen-{name.replace('_', '-')}", "family": "v2r", "n": 8, "vs_IN": 0,
                     "vs_IN_low": 0, "vs_IN_high": 0, "vs_RL": v, "vs_RL_low": lo, "vs_RL_high": hi})
    return pd.DataFrame(rows)


G = (0.25, 0.125, 0.375)
@pytest.mark.parametrize("table, margin, expected", [
    (freezing(G, early=(0, -0.125, 0.125), mid=(-0.25, -0.375, -0.125), late=(-0.25, -0.375, -0.125)), 5, S),
    (freezing(G, mid=(0.25, 0.125, 0.375), late=(0.25, 0.125, 0.375)), 5, C),
    (freezing(G, mid=(0, -0.0, 0.0), late=(0, -0.0, 0.0)), 5, N),
    (freezing(G, mid=(0, -0.125, 0.125), late=(0, -0.125, 0.125)), 12.5, N),    # on the bound
    (freezing(G, mid=(0, -0.125, 0.25), late=(0, -0.125, 0.125)), 12.5, I),     # one line too wide
    (freezing(G, mid=(-0.25, -0.375, -0.125), late=(0, -0.0, 0.0)), 5, I),      # the lines disagree
    (freezing(G, late_mid=(-0.25, -0.375, -0.125), mid=(0.25, 0.125, 0.375)), 5, S),  # mid+late together wins
    (freezing((0.0, -0.125, 0.0), mid=(-0.25, -0.375, -0.125)), 5, X),          # RL does not beat IN
    (freezing((0.0, 0.0, 0.0), mid=(-0.25, -0.375, -0.125)), 5, X),             # a gain of exactly 0
    (freezing((0.125, -0.125, 0.375), mid=(-0.25, -0.375, -0.125)), 5, I),      # RL's gain uncertain
    (freezing((0.0, -0.125, 0.125), mid=(-0.25, -0.375, -0.125)), 12.5, X),     # gain at most the margin
    (freezing((0.0, -0.125, 0.125), mid=(-0.25, -0.375, -0.125)), 12.25, I),    # could exceed it
])
def test_freezing_claim(table, margin, expected) -> None:
    result = claim_freezing(table, ClaimParameters(accuracy_margin=margin))
    assert result.verdict is expected, result.evidence


def test_freezing_control_and_not_tested() -> None:
    result = claim_freezing(freezing(G, early=(0.25, 0.125, 0.375), mid=(-0.25, -0.375, -0.125)), P)
    assert result.verdict is S and result.lines[-1].name.startswith("control")  # the control never votes
    assert claim_freezing(None, P).verdict is T
    assert claim_freezing(freezing(G, early=(0, 0, 0)), P).verdict is T
    assert claim_freezing(freezing(G, mid=(0, 0, 0)), ClaimParameters(freezing_family="perception")).verdict is T


def test_judge_lists_every_claim_and_records_its_evidence() -> None:
    tables = {"weights_tensors": tensors(1.0, 2.0, 2.0), "cross_patching": patching([1.0] * 8),
              "attention_mass": attention([0.75]), "swap_IN": swap([4] * 10), "swap_RL": swap([4] * 10)}
    results = judge(tables, cuts=Cuts.make((2, 5), 8), params=P)
    assert [r.id for r in results] == ["mid_late", "attention", "perception", "transfer", "freezing"]
    assert [r.verdict for r in results] == [S, S, S, T, T]
    record = results[0].as_dict()
    assert record["verdict"] == "supported" and record["lines"][1]["numbers"]["share_mid_late"] == 1.0


def test_restored_is_a_ratio_of_means() -> None:
    frame = pd.DataFrame([{"receiver": "IN", "donor": "RL", "layer": 0, "sample": s, "value": v, "corrupt": c}
                          for s, (v, c) in enumerate([(0.5, 1.0), (0.0, 1e-9), (0.5, 1.0)])])
    row = restored_by_layer(frame, n_resamples=200).iloc[0]
    assert row["restored"] == pytest.approx(1 - 1.0 / (2 + 1e-9))  # a mean of ratios would give 1/3
    assert row["low"] <= row["restored"] <= row["high"] and row["direction"] == "RL -> IN"
