"""Representation drift between checkpoints on identical inputs.

Per site, layer and token group: the mean cosine similarity of the two checkpoints' token
states, the relative norm of their difference ``||A - B||_F / ||A||_F``, and linear CKA
(Kornblith et al. 2019) between the two ``[tokens, d_model]`` matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch
from ..results import Result
from .collect import collect


def linear_cka(x: Float[Tensor, "n d"], y: Float[Tensor, "n e"]) -> float:
    """Linear CKA of two representations of the same ``n`` items (columns centered)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def drift_metrics(a: Float[Tensor, "n d"], b: Float[Tensor, "n d"]) -> dict[str, float]:
    """Cosine similarity (mean over rows), relative difference norm and linear CKA."""
    same = (a == b).all(-1)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    cos = torch.where(same, torch.ones_like(cos), cos)  # identical rows: exactly 1
    rel = torch.linalg.matrix_norm((a - b).double()) / torch.linalg.matrix_norm(a.double()).clamp_min(1e-30)
    return {"cosine": float(cos.mean()), "rel_norm": float(rel), "cka": linear_cka(a, b), "n_tokens": int(a.shape[0])}


class DriftResult(Result):
    """Drift per site, layer and token group. Columns: ``a``, ``b``, ``site``, ``layer``,
    ``unified_layer``, ``group``, ``cosine``, ``rel_norm``, ``cka``, ``n_tokens``."""

    kind = "drift"

    def plot(self, metric: str = "rel_norm", **kwargs: Any) -> go.Figure:
        fig = go.Figure()
        for (site, group), part in self.frame.groupby(["site", "group"], sort=False):
            part = part.sort_values("unified_layer")
            label = group if self.frame["site"].nunique() == 1 else f"{site} / {group}"
            fig.add_trace(go.Scatter(x=part["unified_layer"], y=part[metric], mode="lines+markers", name=label))
        a, b = self.meta.get("a"), self.meta.get("b")
        fig.update_layout(title=kwargs.get("title", f"Representation drift {a} vs {b} ({metric})"),
                          xaxis_title="layer (unified index)", yaxis_title=metric, template="plotly_white",
                          height=420)
        return fig


def representation_drift(
    models: Any,
    batch: Batch,
    *,
    a: str | None = None,
    b: str | None = None,
    sites: Sequence[str] = ("layer_out",),
    layers: Sequence[int] | None = None,
    groups: Sequence[str] = ("vision", "question", "last"),
    batch_size: int = 16,
    progress: bool = True,
) -> DriftResult:
    """Drift between checkpoints ``a`` and ``b`` of a set (default: the first two) on ``batch``."""
    names = list(models)
    if len(names) < 2:
        raise InputError("Representation drift compares two checkpoints; give a checkpoint set with at least two.")
    a = a or names[0]
    b = b or names[1]
    acts = collect({a: models[a], b: models[b]}, batch, sites=sites, layers=layers, groups=groups,
                   batch_size=batch_size, progress=progress)
    rows = []
    for site in sites:
        for group in groups:
            for layer in acts.layers(a, site, group):
                metrics = drift_metrics(acts[(a, site, layer, group)], acts[(b, site, layer, group)])
                rows.append({"a": a, "b": b, "site": site, "layer": layer, "unified_layer": layer + 1,
                             "group": group, **metrics})
    return DriftResult(pd.DataFrame(rows), {"a": a, "b": b, "sites": list(sites), "groups": list(groups)})
