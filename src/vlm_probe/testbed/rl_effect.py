"""Does RL change behaviour here? IN vs RL accuracy per task family, over seeds, with paired CIs.

Every seed's IN and RL checkpoints answer the same held-out items (the held-out set has its
own seed, shared by all builds), so each item gives a paired difference RL - IN. Per seed
and family the table reports both accuracies with bootstrap intervals and the paired
difference (:func:`vlm_probe.stats.paired_difference`); the ``pooled`` rows average each
item's correctness over seeds first and bootstrap over items.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..results import Result
from ..stats import bootstrap, paired_difference
from .build import Testbed, build_testbed, scorer
from .recipe import Recipe
from .tasks import Item
from . import responses


def evaluation_items(testbed: Testbed) -> list[Item]:
    """Held-out items of every family plus the swap-pair scenes (family ``swap``)."""
    return responses.evaluation_items(testbed.recipe)


def score_checkpoint(testbed: Testbed, stage: str, items: Sequence[Item], *, quiet: bool = True,
                     detail: bool = False) -> Any:
    """Correctness (0/1 per item) of one checkpoint's greedy responses, judged by the harness's
    grader; with ``detail`` the :class:`~vlm_probe.testbed.train.Scored` (responses and verdicts).
    Responses the build already generated are read back (:mod:`vlm_probe.testbed.responses`)."""
    path = testbed.checkpoint(stage)
    result = responses.scored(path, items, lambda: scorer(path, quiet))
    return result if detail else result.correct


class RLEffect(Result):
    """IN vs RL accuracy per seed and family (``seed == "pooled"``: items averaged over seeds).

    Columns: ``seed``, ``by`` (``family`` or ``task``), ``group``, ``n``, ``IN``, ``IN_low``,
    ``IN_high``, ``RL``, ``RL_low``, ``RL_high``, ``diff``, ``diff_low``, ``diff_high``.
    """

    kind = "testbed_rl_effect"

    def plot(self, by: str = "family", **kwargs: Any) -> Any:
        import plotly.graph_objects as go

        frame = self.frame[self.frame["by"] == by]
        figure = go.Figure()
        for seed, rows in frame.groupby("seed", sort=False):
            figure.add_bar(
                name=f"seed {seed}",
                x=rows["group"],
                y=rows["diff"],
                error_y=dict(type="data", symmetric=False, array=rows["diff_high"] - rows["diff"],
                             arrayminus=rows["diff"] - rows["diff_low"]),
            )
        figure.update_layout(
            barmode="group", title="RL - IN held-out accuracy (95% paired bootstrap CI)",
            yaxis_title="accuracy difference", xaxis_title=by, **kwargs,
        )
        return figure

    def table(self, by: str = "family") -> pd.DataFrame:
        """A compact text table: accuracies and differences with intervals."""
        frame = self.frame[self.frame["by"] == by].copy()

        def fmt(value: float, low: float, high: float) -> str:
            return f"{value:.3f} [{low:.3f}, {high:.3f}]"

        frame["IN acc"] = [fmt(*r) for r in frame[["IN", "IN_low", "IN_high"]].to_numpy()]
        frame["RL acc"] = [fmt(*r) for r in frame[["RL", "RL_low", "RL_high"]].to_numpy()]
        frame["RL - IN"] = [fmt(*r) for r in frame[["diff", "diff_low", "diff_high"]].to_numpy()]
        return frame[["seed", "group", "n", "IN acc", "RL acc", "RL - IN"]].reset_index(drop=True)


def _rows(seed: Any, items: Sequence[Item], a: np.ndarray, b: np.ndarray, n_resamples: int) -> list[dict[str, Any]]:
    rows = []
    for by in ("family", "task"):
        keys = sorted({(item.family, getattr(item, by)) for item in items})
        for family, key in keys:
            index = [i for i, item in enumerate(items) if item.family == family and getattr(item, by) == key]
            ai, bi = a[index], b[index]
            acc_in = bootstrap(ai, n_resamples=n_resamples)
            acc_rl = bootstrap(bi, n_resamples=n_resamples)
            diff = paired_difference(ai, bi, n_resamples=n_resamples)
            rows.append({
                "seed": str(seed), "by": by, "group": key if by == "family" else f"{family}/{key}", "n": len(index),
                "IN": acc_in.value, "IN_low": acc_in.low, "IN_high": acc_in.high,
                "RL": acc_rl.value, "RL_low": acc_rl.low, "RL_high": acc_rl.high,
                "diff": diff.value, "diff_low": diff.low, "diff_high": diff.high,
            })
    return rows


def rl_effect(
    seeds: Sequence[int] = (0, 1),
    *,
    recipe: Recipe | None = None,
    reduced: bool = False,
    quiet: bool = False,
    cache_dir: str | os.PathLike | None = None,
    n_resamples: int = 2000,
) -> RLEffect:
    """Build (or reuse) the testbed for each seed and compare IN with RL on the shared held-out set.

    Args:
        seeds: recipe seeds (model init, training data, RL sampling); the held-out set is the same.
        recipe: the base recipe (default: the full one, or the reduced one with ``reduced``).
        cache_dir: cache root for the builds.

    Returns:
        An :class:`RLEffect` (``.table()``, ``.to_frame()``, ``.plot()``).
    """
    if len(seeds) < 1:
        raise InputError("rl_effect needs at least one seed (two or more for a claim).")
    base = recipe or (Recipe.reduced_size() if reduced else Recipe())
    rows: list[dict[str, Any]] = []
    per_seed: list[tuple[np.ndarray, np.ndarray]] = []
    items: list[Item] = []
    builds = {}
    for seed in seeds:
        testbed = build_testbed(base.replace(seed=seed), quiet=quiet, cache_dir=cache_dir, variants=())
        items = evaluation_items(testbed)
        a = score_checkpoint(testbed, "IN", items, quiet=quiet)
        b = score_checkpoint(testbed, "RL", items, quiet=quiet)
        per_seed.append((a, b))
        rows += _rows(seed, items, a, b, n_resamples)
        builds[str(seed)] = {"path": str(testbed.path), "times": testbed.info["times"]}
    if len(seeds) > 1:
        a = np.mean([p[0] for p in per_seed], axis=0)
        b = np.mean([p[1] for p in per_seed], axis=0)
        rows += _rows("pooled", items, a, b, n_resamples)
    meta = {"seeds": list(seeds), "recipe_hashes": {str(s): base.replace(seed=s).hash() for s in seeds},
            "builds": builds, "eval_seed": base.eval_seed}
    return RLEffect(pd.DataFrame(rows), meta)
