"""The published claims as pure functions: fact tables in, a verdict with its evidence out.

Every claim is judged from the tables the main job saves (``*.parquet`` beside the report), so
a report can never say something its tables do not support. Verdicts:

* **supported**: the interval lies on the claimed side of zero (and not inside the margin);
* **contradicted**: the interval lies on the other side;
* **no difference shown**: the interval lies inside ``[-margin, +margin]`` (an equivalence
  test with the same 95% interval, i.e. two one-sided tests at 2.5% each);
* **inconclusive**: none of these (the interval is too wide, or lines of evidence disagree);
* **no signal**: the probe found nothing to compare (a swap that changes no answer, RL and IN
  with the same outputs, an RL that does not beat IN, ...);
* **not tested**: the run had no data for this claim (the reason says which file enables it).

A claim that something is *unchanged* (claim ``perception``) is supported only by an
equivalence test, never by overlapping intervals: for it, the equivalence outcome *is* the
support, so it has no separate "no difference shown". Margins and thresholds are the fields
of :class:`ClaimParameters` (recorded in ``run.json``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import pandas as pd

from ..arch.regions import THIRDS, Cuts
from ..errors import InputError
from ..stats import Estimate, paired_difference
from .estimators import paired_items, remaining_share, require, transition_difference


class Verdict(str, Enum):
    """What a run says about a claim."""

    SUPPORTED = "supported"
    CONTRADICTED = "contradicted"
    NO_DIFFERENCE = "no difference shown"
    INCONCLUSIVE = "inconclusive"
    NO_SIGNAL = "no signal"
    NOT_TESTED = "not tested"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ClaimParameters:
    """Margins and thresholds of the claim logic, with their documented defaults.

    Attributes:
        level: confidence level of every interval.
        n_resamples: bootstrap resamples; seed: their seed.
        energy_margin: weights: ``energy share / parameter share - 1`` of the mid+late layers
            within this counts as no difference (exact numbers: no sampling).
        share_margin: patching: the mid+late share of the RL-vs-IN output difference within
            this of the mid+late share of decoder layers counts as no difference.
        min_output_kl: patching: below this mean KL(RL || IN) the outputs do not differ (no signal).
        attention_margin: attention: equivalence margin as a fraction of IN's mean mass.
        min_attention_mass: attention: below this mean mass in both checkpoints, no signal.
        transition_margin: swap: equivalence margin as a fraction of the decoder depth (at
            least one layer).
        min_transition_drop: swap: a transition must lower the change rate by at least this
            much in both checkpoints, else no signal.
        accuracy_margin: transfer and freezing: equivalence margin in accuracy points; RL's own
            gain over IN must be shown (interval above 0), else no signal (gain interval below
            the margin) or inconclusive.
        transfer_metric: the fine-grained metric the transfer claim is judged on.
        freezing_family: the testbed task family the freezing claim is judged on.
    """

    level: float = 0.95
    n_resamples: int = 2000
    seed: int = 0
    energy_margin: float = 0.10
    share_margin: float = 0.05
    min_output_kl: float = 1e-6
    attention_margin: float = 0.10
    min_attention_mass: float = 1e-4
    transition_margin: float = 0.10
    min_transition_drop: float = 0.10
    accuracy_margin: float = 5.0
    transfer_metric: str = "M_v2r"
    freezing_family: str = "v2r"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def transition_layers(self, n_layers: int) -> int:
        """The swap equivalence margin in layers for an ``n_layers`` decoder."""
        return max(1, int(round(self.transition_margin * n_layers)))

    @property
    def _boot(self) -> dict[str, Any]:
        return {"n_resamples": self.n_resamples, "level": self.level, "seed": self.seed}


CLAIMS: dict[str, str] = {
    "mid_late": "RL's changes concentrate in mid-to-late layers.",
    "attention": "Attention from reasoning (generated) tokens to vision tokens rises in mid-to-late layers.",
    "perception": "RL does not change where the image is read: the vision-token swap transition layer is unchanged.",
    "transfer": "RL's mid-to-late blocks transfer by merging (IN with RL's mid and late thirds gains).",
    "freezing": "Freezing the mid-to-late blocks during RL removes the gain.",
}


@dataclass(frozen=True)
class Line:
    """One line of evidence: its own verdict, a sentence, and the numbers behind it."""

    name: str
    verdict: Verdict
    text: str
    numbers: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimResult:
    """A claim, its verdict, and the evidence (one or more lines)."""

    id: str
    text: str
    verdict: Verdict
    lines: tuple[Line, ...]

    @property
    def evidence(self) -> str:
        if len(self.lines) == 1:
            return self.lines[0].text
        return " ".join(f"[{line.name}: {line.verdict}] {line.text}" for line in self.lines)

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "verdict": self.verdict.value, "evidence": self.evidence,
                "lines": [{"name": x.name, "verdict": x.verdict.value, "text": x.text, "numbers": x.numbers}
                          for x in self.lines]}


# ----------------------------------------------------------------------------- decision rules


def decide(estimate: Estimate, margin: float, direction: int = 1) -> Verdict:
    """Verdict on a claimed difference in ``direction`` (+1: the claim says it is positive).

    Inside ``[-margin, margin]`` (bounds included): no difference shown; else the side of zero
    the whole interval lies on; else inconclusive. A missing interval is no signal.
    """
    low, high = estimate.low, estimate.high
    if not (np.isfinite(low) and np.isfinite(high)):
        return Verdict.NO_SIGNAL
    if -margin <= low and high <= margin:
        return Verdict.NO_DIFFERENCE
    if direction < 0:
        low, high = -high, -low
    if low > 0:
        return Verdict.SUPPORTED
    if high < 0:
        return Verdict.CONTRADICTED
    return Verdict.INCONCLUSIVE


def decide_unchanged(estimate: Estimate, margin: float) -> Verdict:
    """Verdict on a claim that something is unchanged: supported only by equivalence (the
    interval inside ``[-margin, margin]``), contradicted when it lies wholly outside."""
    low, high = estimate.low, estimate.high
    if not (np.isfinite(low) and np.isfinite(high)):
        return Verdict.NO_SIGNAL
    if -margin <= low and high <= margin:
        return Verdict.SUPPORTED
    if low > margin or high < -margin:
        return Verdict.CONTRADICTED
    return Verdict.INCONCLUSIVE


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """One verdict from several lines: lines without signal are set aside; the rest must agree,
    else inconclusive."""
    given = list(verdicts)
    live = [v for v in given if v not in (Verdict.NO_SIGNAL, Verdict.NOT_TESTED)]
    if not live:
        return Verdict.NO_SIGNAL if Verdict.NO_SIGNAL in given else Verdict.NOT_TESTED
    return live[0] if all(v is live[0] for v in live) else Verdict.INCONCLUSIVE


def _iv(est: Estimate, fmt: str = "+.1f", unit: str = "") -> str:
    return f"{est.value:{fmt}}{unit} [{est.low:{fmt}}, {est.high:{fmt}}]"


def _numbers(est: Estimate, prefix: str) -> dict[str, float]:
    return {f"{prefix}": est.value, f"{prefix}_low": est.low, f"{prefix}_high": est.high, f"{prefix}_n": est.n}


def _not_tested(claim: str, reason: str) -> ClaimResult:
    return ClaimResult(claim, CLAIMS[claim], Verdict.NOT_TESTED, (Line("data", Verdict.NOT_TESTED, reason),))


# ----------------------------------------------------------------------------- claim 1: where


def weights_line(tensors: pd.DataFrame, params: ClaimParameters = ClaimParameters()) -> Line:
    """Mid+late share of RL's decoder update energy against their share of decoder parameters.

    ``tensors``: one row per tensor and step (``step``, ``region``, ``energy``, ``numel``).
    """
    require(tensors, ("step", "region", "energy", "numel"), "weights (per tensor)")
    llm = tensors[(tensors["step"] == "IN->RL") & tensors["region"].isin(THIRDS)]
    energy = llm.groupby("region")["energy"].sum()
    params_by = llm.groupby("region")["numel"].sum()
    total = float(energy.sum())
    if llm.empty or not total > 0:
        return Line("weights", Verdict.NO_SIGNAL, "RL's decoder weights equal IN's (no update energy).",
                    {"energy_total": total})
    e_ml = float(energy.get("mid", 0) + energy.get("late", 0)) / total
    p_ml = float(params_by.get("mid", 0) + params_by.get("late", 0)) / float(params_by.sum())
    ratio = e_ml / p_ml if p_ml > 0 else float("nan")
    effect = Estimate(ratio - 1, ratio - 1, ratio - 1, len(llm))
    verdict = decide(effect, params.energy_margin)
    text = (f"mid+late layers hold {100 * e_ml:.0f}% of RL's decoder update energy (squared delta norm) and "
            f"{100 * p_ml:.0f}% of the decoder parameters: {ratio:.2f}x their share (exact, no sampling; "
            f"no difference within {1 - params.energy_margin:.2f}-{1 + params.energy_margin:.2f}x).")
    return Line("weights", verdict, text, {"energy_share_mid_late": e_ml, "param_share_mid_late": p_ml,
                                           "ratio": ratio})


def patching_line(patching: pd.DataFrame, cuts: Cuts, params: ClaimParameters = ClaimParameters()) -> Line:
    """Share of the RL-vs-IN output difference that arises in the mid and late layers: the KL
    left after patching RL's residual stream into IN at the end of the early third, over the KL
    without the patch (ratio of means over prompts), against the mid+late share of layers.

    ``patching``: a cross-checkpoint sweep with ``kl_to_clean`` (``receiver``, ``donor``,
    ``layer``, ``sample``, ``value``, ``corrupt``).
    """
    require(patching, ("receiver", "donor", "layer", "sample", "value", "corrupt"), "cross-checkpoint patching")
    into = patching[(patching["receiver"] == "IN") & (patching["donor"] == "RL")]
    end_early = cuts.mid - 1
    part = into[into["layer"] == end_early].sort_values("sample")
    if part.empty:
        raise InputError(f"The cross-checkpoint patching table has no RL -> IN row at decoder layer {end_early} "
                         f"(the end of the early third, cuts {cuts.mid},{cuts.late}); sweep every layer.")
    before = float(part["corrupt"].mean())
    if not before >= params.min_output_kl:
        return Line("patching", Verdict.NO_SIGNAL, f"RL and IN give the same outputs on these prompts (mean "
                    f"KL(RL || IN) {before:.2g} < {params.min_output_kl:g}).", {"mean_kl": before})
    share = remaining_share(part["value"].to_numpy(), part["corrupt"].to_numpy(), **params._boot)
    layer_share = (cuts.n_layers - cuts.mid) / cuts.n_layers
    effect = Estimate(share.value - layer_share, share.low - layer_share, share.high - layer_share, share.n)
    verdict = decide(effect, params.share_margin)
    text = (f"{100 * share.value:.0f}% [{100 * share.low:.0f}, {100 * share.high:.0f}] of the RL-vs-IN output "
            f"difference (KL, ratio of means over {share.n} prompts) arises in the mid and late layers "
            f"(L{cuts.mid + 1}-L{cuts.n_layers}), which are {100 * layer_share:.0f}% of the decoder (no difference "
            f"within {100 * params.share_margin:.0f} points).")
    return Line("patching", verdict, text, {**_numbers(share, "share_mid_late"), "layer_share": layer_share,
                                            "mean_kl": before})


def claim_mid_late(tensors: pd.DataFrame | None, patching: pd.DataFrame | None, cuts: Cuts | None,
                   params: ClaimParameters = ClaimParameters()) -> ClaimResult:
    """Claim 1 from the weight deltas and the cross-checkpoint patching (both lines must agree)."""
    lines = []
    if tensors is not None:
        lines.append(weights_line(tensors, params))
    if patching is not None and cuts is not None:
        lines.append(patching_line(patching, cuts, params))
    if not lines:
        return _not_tested("mid_late", "Needs the weight comparison or the cross-checkpoint patching.")
    return ClaimResult("mid_late", CLAIMS["mid_late"], combine([x.verdict for x in lines]), tuple(lines))


# ----------------------------------------------------------------------------- claim 2: attention


def claim_attention(attention: pd.DataFrame | None, cuts: Cuts | None,
                    params: ClaimParameters = ClaimParameters()) -> ClaimResult:
    """Claim 2: RL minus IN attention mass of generated tokens on vision tokens, averaged over the
    mid and late layers, paired over prompts.

    ``attention``: ``checkpoint``, ``sample``, ``layer`` (0-based), ``mass`` (any heads).
    """
    if attention is None or cuts is None:
        return _not_tested("attention", "Needs prompts with images (any data file with images).")
    require(attention, ("checkpoint", "sample", "layer", "mass"), "attention mass")
    ml = attention[attention["layer"] >= cuts.mid]
    per = ml.groupby(["checkpoint", "sample"])["mass"].mean().unstack(0)
    if not {"IN", "RL"} <= set(per.columns):
        raise InputError(f"The attention table needs checkpoints IN and RL in the mid+late layers; it has "
                         f"{sorted(per.columns)}.")
    per = per[["IN", "RL"]].dropna()
    base = float(per["IN"].mean()) if len(per) else float("nan")
    if per.empty or not max(base, float(per["RL"].mean())) >= params.min_attention_mass:
        line = Line("attention", Verdict.NO_SIGNAL, f"Neither checkpoint's generated tokens attend to the vision "
                    f"tokens in the mid and late layers (mean mass below {params.min_attention_mass:g}).",
                    {"mass_IN": base})
        return ClaimResult("attention", CLAIMS["attention"], Verdict.NO_SIGNAL, (line,))
    est = paired_difference(per["IN"].to_numpy(), per["RL"].to_numpy(), **params._boot)
    margin = params.attention_margin * base
    verdict = decide(est, margin)
    text = (f"RL minus IN attention mass of generated tokens on the vision tokens, mid and late layers "
            f"(L{cuts.mid + 1}-L{cuts.n_layers}): {_iv(est, '+.4f')} (paired over {est.n} prompts; IN's mass "
            f"{base:.4f}; no difference within +-{margin:.4f}, {100 * params.attention_margin:.0f}% of IN's).")
    line = Line("attention", verdict, text, {**_numbers(est, "difference"), "mass_IN": base, "margin": margin})
    return ClaimResult("attention", CLAIMS["attention"], verdict, (line,))


# ----------------------------------------------------------------------------- claim 3: perception


def claim_perception(swap_in: pd.DataFrame | None, swap_rl: pd.DataFrame | None, n_layers: int | None,
                     params: ClaimParameters = ClaimParameters()) -> ClaimResult:
    """Claim 3: the swap transition layer of RL equals IN's, within a margin (equivalence).

    ``swap_in`` / ``swap_rl``: the swap sweeps of IN and RL on the same pairs (``sample``,
    ``layer``, ``changed``).
    """
    if swap_in is None or swap_rl is None or n_layers is None:
        return _not_tested("perception", "Needs vision-token swap pairs (swap.jsonl or the published layout).")
    t = transition_difference(swap_in, swap_rl, **params._boot)
    numbers = t.as_dict()
    if min(t.drop_a, t.drop_b) < params.min_transition_drop:
        text = (f"The swap has no transition to compare: the change rate drops by at most {100 * t.drop_a:.0f} "
                f"points (IN, at L{t.a + 1}) and {100 * t.drop_b:.0f} points (RL, at L{t.b + 1}) from one start "
                f"layer to the next (needs {100 * params.min_transition_drop:.0f}).")
        line = Line("swap", Verdict.NO_SIGNAL, text, numbers)
        return ClaimResult("perception", CLAIMS["perception"], Verdict.NO_SIGNAL, (line,))
    margin = params.transition_layers(n_layers)
    verdict = decide_unchanged(t.difference, margin)
    d = t.difference
    said = {Verdict.SUPPORTED: "no difference shown: the interval lies within",
            Verdict.CONTRADICTED: "a difference shown: the interval lies outside",
            Verdict.INCONCLUSIVE: "the interval is not within"}[verdict]
    text = (f"Transition layer IN L{t.a + 1} (drop {100 * t.drop_a:.0f} points), RL L{t.b + 1} (drop "
            f"{100 * t.drop_b:.0f}); RL - IN = {d.value:+.0f} layers [{d.low:+.0f}, {d.high:+.0f}] (paired bootstrap "
            f"over {d.n} pairs); {said} +-{margin} layer(s).")
    line = Line("swap", verdict, text, {**numbers, "margin_layers": margin})
    return ClaimResult("perception", CLAIMS["perception"], verdict, (line,))


# ----------------------------------------------------------------------------- claims 4 and 5: the gain


def gain_gate(gain: Estimate, params: ClaimParameters, what: str) -> Line | None:
    """None when RL's gain over IN is shown (interval above 0); else the line that stops the claim:
    no signal (RL does not beat IN by more than the margin) or inconclusive."""
    if gain.n == 0 or not np.isfinite(gain.low):
        return Line("gain", Verdict.NO_SIGNAL, f"No items scored for {what}.")
    if gain.low > 0:
        return None
    if gain.high <= params.accuracy_margin:
        return Line("gain", Verdict.NO_SIGNAL, f"RL does not beat IN on {what}: RL - IN = {_iv(gain, unit=' points')} "
                    f"(n={gain.n}), so there is no gain to follow.", _numbers(gain, "gain"))
    return Line("gain", Verdict.INCONCLUSIVE, f"RL's own gain on {what} is not established: RL - IN = "
                f"{_iv(gain, unit=' points')} (n={gain.n}).", _numbers(gain, "gain"))


def claim_transfer(items: pd.DataFrame | None, params: ClaimParameters = ClaimParameters()) -> ClaimResult:
    """Claim 4: IN with RL's mid and late thirds (``IN:RL:RL``) beats IN, given that RL does.

    ``items``: per-item outcomes of the transfer table (``variant``, ``metric``, ``id``,
    ``value`` 0/1; optional ``host``), paired by ``id``.
    """
    metric = params.transfer_metric
    if items is None:
        return _not_tested("transfer", "Needs graded VQA items (perception.jsonl, v2r.jsonl) or text items.")
    require(items, ("variant", "metric", "id", "value"), "transfer (per item)")
    part = items[items["metric"] == metric]
    if part.empty:
        return _not_tested("transfer", f"The transfer table has no {metric} items (it has "
                           f"{sorted(set(items['metric']))}); {metric} needs v2r.jsonl.")
    for variant in ("IN", "RL", "IN:RL:RL"):
        if variant not in set(part["variant"]):
            raise InputError(f"The transfer table lacks the variant {variant!r} (it has "
                             f"{sorted(set(part['variant']))}).")
    boot = params._boot
    gain = paired_items(part, "IN", "RL", **boot)
    stop = gain_gate(gain, params, metric)
    if stop is not None:
        return ClaimResult("transfer", CLAIMS["transfer"], stop.verdict, (stop,))
    moved = paired_items(part, "IN", "IN:RL:RL", **boot)
    verdict = decide(moved, params.accuracy_margin)
    host = ""
    if "host" in part:
        hosts = dict(zip(part["variant"], part["host"]))
        host = f" IN:RL:RL's vision tower and head come from {hosts.get('IN:RL:RL', '?')}."
    early = ""
    if "RL:IN:IN" in set(part["variant"]):
        e = paired_items(part, "IN", "RL:IN:IN", **boot)
        early = f" RL's early third alone (RL:IN:IN): {_iv(e, unit=' points')}."
    text = (f"{metric}: RL - IN = {_iv(gain, unit=' points')}; IN:RL:RL - IN = {_iv(moved, unit=' points')} "
            f"(paired over {moved.n} items; no difference within +-{params.accuracy_margin:g} points).{early}{host}")
    line = Line("transfer", verdict, text, {**_numbers(gain, "gain"), **_numbers(moved, "transfer")})
    return ClaimResult("transfer", CLAIMS["transfer"], verdict, (line,))


def _frozen_regions(variant: str) -> frozenset[str]:
    return frozenset(variant[len("RL-frozen-"):].replace("+", "-").split("-")) if variant.startswith("RL-frozen-") \
        else frozenset()


def claim_freezing(table: pd.DataFrame | None, params: ClaimParameters = ClaimParameters()) -> ClaimResult:
    """Claim 5: RL with the mid or late third frozen falls short of RL (given RL beats IN).

    ``table``: the necessity table (``variant`` IN / RL / ``RL-frozen-<regions>``, ``family``,
    ``vs_IN``, ``vs_RL`` and their ``_low`` / ``_high``, as fractions). Judged on
    ``params.freezing_family`` in points; a variant freezing both mid and late is used when
    there is one, else the mid and the late variants must agree.
    """
    if table is None:
        return _not_tested("freezing", "Needs RL re-runs with blocks frozen: the built-in testbed only.")
    columns = ("variant", "family", "vs_IN", "vs_IN_low", "vs_IN_high", "vs_RL", "vs_RL_low", "vs_RL_high")
    require(table, columns, "freezing")
    family = params.freezing_family
    part = table[table["family"] == family].set_index("variant")
    if "RL" not in part.index:
        return _not_tested("freezing", f"The freezing table has no RL row for family {family!r} (families: "
                           f"{sorted(set(table['family']))}).")

    def points(row: pd.Series, key: str) -> Estimate:
        n = int(row["n"]) if "n" in row else 0
        return Estimate(100 * row[key], 100 * row[f"{key}_low"], 100 * row[f"{key}_high"], n)

    gain = points(part.loc["RL"], "vs_IN")
    stop = gain_gate(gain, params, f"{family} accuracy")
    if stop is not None:
        return ClaimResult("freezing", CLAIMS["freezing"], stop.verdict, (stop,))
    regions = {v: _frozen_regions(v) for v in part.index}
    both = [v for v, r in regions.items() if r == {"mid", "late"}]
    chosen = both or [v for v, r in regions.items() if r in ({"mid"}, {"late"})]
    if not chosen:
        return _not_tested("freezing", "No RL variant froze the mid or the late third.")
    lines = []
    for variant in chosen:
        loss = points(part.loc[variant], "vs_RL")
        verdict = decide(loss, params.accuracy_margin, direction=-1)
        text = (f"{variant} - RL = {_iv(loss, unit=' points')} on {family} accuracy (RL - IN = "
                f"{_iv(gain, unit=' points')}; paired bootstrap; no difference within +-{params.accuracy_margin:g}).")
        lines.append(Line(variant, verdict, text, {**_numbers(loss, "vs_RL"), **_numbers(gain, "gain")}))
    verdict = combine([x.verdict for x in lines])
    control = [v for v, r in regions.items() if r == {"early"}]
    if control:  # shown beside the claim, not part of its verdict
        e = points(part.loc[control[0]], "vs_RL")
        lines.append(Line(f"control {control[0]}", decide(e, params.accuracy_margin, direction=-1),
                          f"{control[0]} - RL = {_iv(e, unit=' points')}.", _numbers(e, "vs_RL")))
    return ClaimResult("freezing", CLAIMS["freezing"], verdict, tuple(lines))


# ----------------------------------------------------------------------------- all claims


def judge(tables: Mapping[str, pd.DataFrame], *, cuts: Cuts | None, params: ClaimParameters = ClaimParameters()
          ) -> list[ClaimResult]:
    """Every claim from the saved tables (missing tables make a claim *not tested*).

    Tables used: ``weights_tensors``, ``cross_patching``, ``attention_mass``, ``swap_IN``,
    ``swap_RL``, ``transfer_items``, ``freezing``.
    """
    get = tables.get
    n_layers = cuts.n_layers if cuts is not None else None
    return [
        claim_mid_late(get("weights_tensors"), get("cross_patching"), cuts, params),
        claim_attention(get("attention_mass"), cuts, params),
        claim_perception(get("swap_IN"), get("swap_RL"), n_layers, params),
        claim_transfer(get("transfer_items"), params),
        claim_freezing(get("freezing"), params),
    ]
