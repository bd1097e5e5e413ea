"""The necessity experiment on the testbed: RL re-run with each third of the decoder frozen.

If a block is necessary for what RL achieves, RL with that block frozen should fall short of
unfrozen RL. :func:`necessity_table` builds (or reuses) one RL variant per freezing spec with
:func:`~vlm_probe.testbed.build.build_rl_variant` (same recipe, data and sampling seeds as the
build's own RL), scores IN, RL and every variant greedily on the shared held-out items, and
reports accuracy per family with paired bootstrap intervals against IN and against unfrozen RL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..results import Result
from ..stats import bootstrap, paired_difference
from .build import Testbed, build_rl_variant
from .freezing import FreezeSpec, describe_freeze
from .rl_effect import evaluation_items, score_checkpoint


class NecessityTable(Result):
    """Held-out accuracy after RL with parts frozen.

    One row per ``variant`` (``IN``, ``RL``, ``RL-frozen-<regions>``) and ``family``: ``n``,
    ``accuracy`` (``low``, ``high``), ``vs_IN`` and ``vs_RL`` paired differences (variant minus
    IN / RL) with their intervals. ``meta["rl_reward"]`` holds each RL run's mean sampled reward
    over its first and last 50 steps.
    """

    kind = "testbed_necessity"

    def summary(self) -> pd.DataFrame:
        """Variants x families: ``accuracy (variant - RL [low, high])``."""
        frame = self.frame.copy()

        def cell(row: pd.Series) -> str:
            if row["variant"] in ("IN", "RL"):
                return f"{row['accuracy']:.3f}"
            return f"{row['accuracy']:.3f} ({row['vs_RL']:+.3f} [{row['vs_RL_low']:+.3f}, {row['vs_RL_high']:+.3f}])"

        frame["cell"] = frame.apply(cell, axis=1)
        wide = frame.pivot(index="variant", columns="family", values="cell")
        order = [v for v in dict.fromkeys(self.frame["variant"])]
        return wide.loc[order].reset_index()

    def plot(self, **kwargs: Any) -> Any:
        import plotly.graph_objects as go

        figure = go.Figure()
        for variant, rows in self.frame.groupby("variant", sort=False):
            figure.add_bar(
                name=variant, x=rows["family"], y=rows["accuracy"],
                error_y=dict(type="data", symmetric=False, array=rows["high"] - rows["accuracy"],
                             arrayminus=rows["accuracy"] - rows["low"]),
            )
        figure.update_layout(barmode="group", title="Held-out accuracy after RL with one block frozen (95% CI)",
                             yaxis_title="exact-match accuracy", xaxis_title="task family", **kwargs)
        return figure


def _reward_trend(log: list[dict[str, float]], window: int = 50) -> dict[str, float]:
    rewards = [row["reward"] for row in log]
    return {"first": float(np.mean(rewards[:window])), "last": float(np.mean(rewards[-window:]))}


def necessity_table(
    testbed: Testbed,
    *,
    freeze: Sequence[FreezeSpec] = ("early", "mid", "late"),
    rl_seed: int = 0,
    quiet: bool = False,
    n_resamples: int = 2000,
) -> NecessityTable:
    """Build (or reuse) one RL variant per freezing spec and compare them with IN and RL.

    Args:
        testbed: a finished build (:func:`~vlm_probe.testbed.build.build_testbed`).
        freeze: the freezing specs, one variant each: region names (``"early"``), collections of
            regions, or :class:`~vlm_probe.weights.plans.FreezePlan` objects.
        rl_seed: offset of the variants' RL seeds (0: the build's own, so only the freezing differs).
        quiet: no progress bars or messages.

    Returns:
        A :class:`NecessityTable` (``.summary()``, ``.to_frame()``, ``.plot()``).
    """
    import json

    items = evaluation_items(testbed)
    scores = {"IN": score_checkpoint(testbed, "IN", items), "RL": score_checkpoint(testbed, "RL", items)}
    rewards = {"RL": _reward_trend(testbed.info["rl_log"])}
    for spec in freeze:
        path = build_rl_variant(testbed, spec, rl_seed=rl_seed, quiet=quiet)
        label = "RL-frozen-" + "-".join(describe_freeze(spec) if not callable(spec) else [path.name])
        scores[label] = score_checkpoint(testbed, path.name, items)
        rewards[label] = _reward_trend(json.loads((path / "variant.json").read_text())["rl_log"])
    rows = []
    families = list(dict.fromkeys(item.family for item in items))
    for variant, correct in scores.items():
        for family in families:
            index = [k for k, item in enumerate(items) if item.family == family]
            acc = bootstrap(correct[index], n_resamples=n_resamples)
            vs_in = paired_difference(scores["IN"][index], correct[index], n_resamples=n_resamples)
            vs_rl = paired_difference(scores["RL"][index], correct[index], n_resamples=n_resamples)
            rows.append({
                "variant": variant, "family": family, "n": len(index),
                "accuracy": acc.value, "low": acc.low, "high": acc.high,
                "vs_IN": vs_in.value, "vs_IN_low": vs_in.low, "vs_IN_high": vs_in.high,
                "vs_RL": vs_rl.value, "vs_RL_low": vs_rl.low, "vs_RL_high": vs_rl.high,
            })
    meta = {"testbed": str(testbed.path), "recipe_hash": testbed.recipe.hash(), "rl_seed": rl_seed,
            "cuts": testbed.recipe.cuts, "rl_reward": rewards}
    return NecessityTable(pd.DataFrame(rows), meta)
