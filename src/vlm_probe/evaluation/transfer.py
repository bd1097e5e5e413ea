"""The transfer table: IN, RL and block-merge variants scored with the harness.

Each variant is spliced into the loaded host model in memory (``weights.merge.splice``: no
checkpoint written, no second model loaded), evaluated, and restored. The table gives M_vis,
M_v2r and M_rea (or any accuracy the harness computes) per variant with bootstrap intervals.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from ..results import Result
from ..weights.merge import open_all, splice
from ..weights.plans import EARLY_HOST, MergePlan, published_variants
from .metrics import METRICS, FineGrained
from .suite import evaluate_fine_grained


class TransferTable(Result):
    """One row per variant x metric: ``variant``, ``host`` (the checkpoint that supplied the vision
    tower, projector, embeddings and head), ``metric``, ``value``, ``low``, ``high``, ``n``
    (percentages for M_vis / M_v2r / M_rea), in the order the variants were given."""

    kind = "transfer_table"

    def wide(self, value: str = "value") -> pd.DataFrame:
        """Variants as rows, metrics as columns."""
        order = list(dict.fromkeys(self.frame["variant"]))
        table = self.frame.pivot_table(index="variant", columns="metric", values=value, sort=False)
        return table.loc[order]

    def plot(self, **kwargs: Any) -> go.Figure:
        fig = go.Figure()
        for metric, part in self.frame.groupby("metric", sort=False):
            fig.add_bar(name=metric, x=part["variant"], y=part["value"],
                        error_y={"type": "data", "symmetric": False, "array": part["high"] - part["value"],
                                 "arrayminus": part["value"] - part["low"]})
        fig.update_layout(barmode="group", title=kwargs.get("title", "Transfer table: block merges between IN and RL"),
                          xaxis_title="variant (early:mid:late)", yaxis_title="%", template="plotly_white",
                          height=440)
        return fig


def transfer_table(
    vlm: Any,
    checkpoints: Mapping[str, str | os.PathLike],
    plans: Mapping[str, MergePlan] | None = None,
    *,
    host: str = "IN",
    donor: str = "RL",
    cuts: tuple[int, int] | None = None,
    merge_host: str | None = EARLY_HOST,
    general: Any = None,
    math: Any = None,
    reasoning: Any = None,
    evaluate: Callable[[Any, str], pd.DataFrame] | None = None,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **options: Any,
) -> TransferTable:
    """Score the host, the donor and every merge variant.

    Args:
        vlm: the checkpoint named ``host``, loaded with :func:`vlm_probe.load` (merges are spliced
            into it, whatever their own host).
        checkpoints: ``{"IN": path, "RL": path, ...}`` safetensors checkpoint directories.
        plans: variants to score (default: the six published early:mid:late thirds).
        host: the name of the checkpoint ``vlm`` holds; donor: the other one.
        merge_host: for the default plans, where each variant's vision tower, projector,
            embeddings and head come from: ``"early"`` (the early third's source, as published)
            or a checkpoint name (see :func:`~vlm_probe.weights.plans.thirds_plan`).
        general: VQA items for M_vis (see :func:`~vlm_probe.evaluation.suite.evaluate_fine_grained`).
        math: VQA items with descriptions for M_v2r.
        reasoning: text-only items for M_rea.
        evaluate: instead of the fine-grained metrics, ``evaluate(vlm, variant) -> DataFrame``
            with columns ``metric, value, low, high, n`` (any metric).
        out: keep each variant's resumable runs under ``out/<variant>/``.
    """
    plans = dict(plans) if plans is not None else published_variants(host, donor, cuts=cuts, host=merge_host)
    variants: dict[str, MergePlan | None] = {host: None,
                                             donor: MergePlan(donor, (), name=donor)}
    variants.update(plans)
    opened = open_all(checkpoints)
    frames = []
    for name, plan in variants.items():
        context = splice(vlm.hf, plan, opened, loaded=host) if plan is not None else contextlib.nullcontext()
        with context:
            if evaluate is not None:
                frame = evaluate(vlm, name).copy()
            else:
                result: FineGrained = evaluate_fine_grained(
                    vlm, general=general, math=math, reasoning=reasoning, name=name,
                    out=Path(out) / _safe(name) if out is not None else None, quiet=not progress, **options,
                )
                frame = result.metrics()
            frame["variant"] = name
            frame["host"] = plan.host if plan is not None else host
            frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    columns = ["variant", "host", "metric", "value", "low", "high", "n"]
    table = table[[c for c in columns if c in table]]
    return TransferTable(table, {"host": host, "donor": donor, "variants": list(variants),
                                 "plans": {k: p.to_dict() for k, p in plans.items()},
                                 "metrics": list(METRICS) if evaluate is None else None})


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
