"""Estimators the main job needs that ``vlm_probe.analyses`` does not provide (yet).

* :func:`restored_by_layer`: the share of the donor-vs-receiver output difference restored by
  patching each layer, as a **ratio of means** over prompts (``1 - mean KL after / mean KL
  before``), with a bootstrap interval over prompts. The per-prompt ratio (the ``restored``
  metric) is unstable where single KLs are tiny; the ratio of means is not.
* :func:`transition_difference`: the swap transition layer of two checkpoints on the same
  pairs, and the paired bootstrap of their difference (pairs resampled jointly).
* :func:`paired_items`: a paired difference of per-item 0/1 outcomes between two variants.

All are pure functions of tables; every interval is a percentile bootstrap (``stats``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..stats import Estimate, paired_difference


def require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise a specific :class:`InputError` when ``frame`` lacks any of ``columns``."""
    missing = [c for c in columns if c not in frame]
    if missing:
        raise InputError(f"The {what} table lacks column(s) {missing}; it has {list(frame.columns)}.")


def _ratio_of_means(after: np.ndarray, before: np.ndarray) -> float:
    denominator = float(before.mean())
    return float(after.mean()) / denominator if denominator > 0 else float("nan")


def remaining_share(after: np.ndarray, before: np.ndarray, *, n_resamples: int = 2000, level: float = 0.95,
                    seed: int = 0) -> Estimate:
    """``mean(after) / mean(before)`` over prompts (the share of a difference left after a patch),
    with a percentile bootstrap over prompts (paired: one index draws both)."""
    after, before = np.asarray(after, dtype=float), np.asarray(before, dtype=float)
    if after.shape != before.shape:
        raise InputError(f"after and before need one value per prompt each; got {after.shape} and {before.shape}.")
    if after.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, level)
    value = _ratio_of_means(after, before)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, after.size, size=(n_resamples, after.size))
    num, den = after[idx].mean(1), before[idx].mean(1)
    stats = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return Estimate(value, float("nan"), float("nan"), int(after.size), level)
    alpha = (1 - level) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return Estimate(value, float(low), float(high), int(after.size), level)


def restored_by_layer(frame: pd.DataFrame, *, n_resamples: int = 2000, level: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
    """Per direction and layer: ``restored = 1 - mean(value) / mean(corrupt)`` with a 95% bootstrap
    interval over prompts.

    ``frame`` is a cross-checkpoint sweep with a divergence metric (``kl_to_clean``): columns
    ``receiver``, ``donor``, ``layer``, ``sample``, ``value`` (divergence from the donor after
    the patch) and ``corrupt`` (before it). Returns ``direction, receiver, donor, layer,
    unified_layer, restored, low, high, n``.
    """
    require(frame, ("receiver", "donor", "layer", "sample", "value", "corrupt"), "cross-checkpoint patching")
    rows = []
    for (receiver, donor, layer), part in frame.groupby(["receiver", "donor", "layer"], sort=True):
        part = part.sort_values("sample")
        est = remaining_share(part["value"].to_numpy(), part["corrupt"].to_numpy(), n_resamples=n_resamples,
                              level=level, seed=seed)
        rows.append({"direction": f"{donor} -> {receiver}", "receiver": receiver, "donor": donor,
                     "layer": int(layer), "unified_layer": int(layer) + 1, "restored": 1 - est.value,
                     "low": 1 - est.high, "high": 1 - est.low, "n": est.n})
    return pd.DataFrame(rows, columns=["direction", "receiver", "donor", "layer", "unified_layer", "restored",
                                       "low", "high", "n"])


@dataclass(frozen=True)
class Transitions:
    """Transition layers (0-based start layers) of two checkpoints and their paired difference."""

    a: int
    b: int
    drop_a: float
    drop_b: float
    difference: Estimate  #: b - a in layers, paired bootstrap over pairs

    def as_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "drop_a": self.drop_a, "drop_b": self.drop_b,
                **self.difference.as_dict("difference_")}


def _rates(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples x start layers matrix of ``changed`` (0/1), the layers and the sample ids."""
    table = frame.pivot_table(index="sample", columns="layer", values="changed", aggfunc="mean")
    return table.to_numpy(dtype=float), np.asarray(table.columns), np.asarray(table.index)


def pick_transition(rates: np.ndarray, layers: np.ndarray) -> tuple[int, float]:
    """The start layer whose change rate dropped most against one layer earlier, and that drop
    (the rule of :meth:`vlm_probe.analyses.SwapResult.transition_layer`)."""
    drops = rates[:-1] - rates[1:]
    i = int(np.argmax(drops))
    return int(layers[i + 1]), float(drops[i])


def transition_difference(a: pd.DataFrame, b: pd.DataFrame, *, n_resamples: int = 2000, level: float = 0.95,
                          seed: int = 0) -> Transitions:
    """Transition layers of two swap sweeps on the same pairs and the bootstrap of ``b - a``.

    ``a`` and ``b`` are swap tables (``sample``, ``layer``, ``changed``) over the same samples
    and start layers; each resample draws pairs once for both checkpoints.
    """
    for frame, name in ((a, "first"), (b, "second")):
        require(frame, ("sample", "layer", "changed"), f"{name} swap")
    ra, layers_a, samples_a = _rates(a)
    rb, layers_b, samples_b = _rates(b)
    if not (np.array_equal(layers_a, layers_b) and np.array_equal(samples_a, samples_b)):
        raise InputError("The two swap tables must cover the same pairs and start layers (a paired comparison).")
    if len(layers_a) < 2:
        raise InputError("A transition layer needs at least two start layers.")
    la, da = pick_transition(ra.mean(0), layers_a)
    lb, db = pick_transition(rb.mean(0), layers_a)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, len(ra), len(ra))
        diffs[r] = pick_transition(rb[idx].mean(0), layers_a)[0] - pick_transition(ra[idx].mean(0), layers_a)[0]
    alpha = (1 - level) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    return Transitions(la, lb, da, db, Estimate(float(lb - la), float(low), float(high), len(ra), level))


def paired_items(frame: pd.DataFrame, a: str, b: str, *, by: str = "variant", n_resamples: int = 2000,
                 level: float = 0.95, seed: int = 0, scale: float = 100.0) -> Estimate:
    """``b - a`` of per-item outcomes (``id``, ``value``) paired by ``id``, times ``scale``
    (points for 0/1 outcomes), with a paired bootstrap over the items both have."""
    require(frame, (by, "id", "value"), "per-item outcome")
    left = frame[frame[by] == a].set_index("id")["value"]
    right = frame[frame[by] == b].set_index("id")["value"]
    joined = pd.concat({"a": left, "b": right}, axis=1, join="inner")
    if joined.empty:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, level)
    est = paired_difference(joined["a"].to_numpy(float), joined["b"].to_numpy(float), n_resamples=n_resamples,
                            level=level, seed=seed)
    return Estimate(scale * est.value, scale * est.low, scale * est.high, est.n, level)
