"""Plotly figures for analysis results (layers on the unified index: decoder layer i is L{i+1})."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..arch import unified_index_label
from ..stats import bootstrap


def _panels(frame: pd.DataFrame, keys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    keys = [k for k in keys if k in frame and frame[k].nunique() > 1]
    if not keys:
        return [("", frame)]
    return [(" / ".join(str(v) for v in (name if isinstance(name, tuple) else (name,))), part)
            for name, part in frame.groupby(keys, sort=False)]


def layer_curves(
    frame: pd.DataFrame,
    value: str,
    *,
    series: str | None,
    title: str,
    y_title: str,
    x: str = "unified_layer",
    ci: bool = True,
) -> go.Figure:
    """Mean of ``value`` per layer (one line per ``series``) with bootstrap 95% bands over samples."""
    fig = go.Figure()
    groups = [("", frame)] if series is None else list(frame.groupby(series, sort=False))
    for name, part in groups:
        xs, mean, low, high = [], [], [], []
        for layer, cell in part.groupby(x, sort=True):
            values = cell[value].dropna().to_numpy()
            est = bootstrap(values, n_resamples=500) if ci and len(values) > 1 else None
            xs.append(layer)
            mean.append(float(np.mean(values)) if len(values) else np.nan)
            low.append(est.low if est else np.nan)
            high.append(est.high if est else np.nan)
        label = str(name) if name != "" else value
        fig.add_trace(go.Scatter(x=xs, y=mean, mode="lines+markers", name=label))
        if ci and not all(np.isnan(low)):
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=high + low[::-1], fill="toself", opacity=0.2,
                                     line={"width": 0}, showlegend=False, hoverinfo="skip", name=f"{label} CI"))
    fig.update_layout(title=title, xaxis_title="layer (unified index: decoder layer i = i + 1)",
                      yaxis_title=y_title, template="plotly_white", height=420)
    return fig


def patching_figure(result: Any, value: str | None = None, **kwargs: Any) -> go.Figure:
    """Heatmap (layers x positions) of the mean effect; a curve when there is one position cell."""
    frame = result.frame
    value = value or ("normalized" if "normalized" in frame else "value")
    metric = frame["metric"].iloc[0] if len(frame) else ""
    title = kwargs.pop("title", f"Patching effect ({metric}, {value})")
    if frame["positions"].nunique() == 1:
        series = next((k for k in ("receiver", "site") if k in frame and frame[k].nunique() > 1), None)
        if series == "receiver":
            frame = frame.assign(direction=frame["donor"] + " -> " + frame["receiver"])
            series = "direction"
        return layer_curves(frame, value, series=series, title=title, y_title=value)
    panels = _panels(frame, ["receiver", "site"])
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[p[0] for p in panels], shared_yaxes=True)
    for col, (_, part) in enumerate(panels, start=1):
        table = part.pivot_table(index="positions", columns="unified_layer", values=value, aggfunc="mean", sort=False)
        fig.add_trace(
            go.Heatmap(z=table.to_numpy(), x=[unified_index_label(int(c)) for c in table.columns], y=list(table.index),
                       colorscale="RdBu", zmid=0, coloraxis="coloraxis",
                       hovertemplate="layer %{x}<br>positions %{y}<br>" + value + " %{z:.3f}<extra></extra>"),
            row=1, col=col,
        )
    fig.update_layout(title=title, template="plotly_white", height=max(320, 22 * frame["positions"].nunique() + 160),
                      coloraxis={"colorscale": "RdBu", "cmid": 0})
    return fig
