"""Plotly figures of a :class:`~vlm_probe.weights.WeightComparison`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..errors import InputError
from .regions import REGIONS

if TYPE_CHECKING:
    from .result import WeightComparison

_COLORS = qualitative.Plotly


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _layer_traces(result: WeightComparison, metric: str) -> list[go.Scatter]:
    table = result.by_layer()
    if metric not in table:
        raise InputError(f"metric must be a column of by_layer() ({', '.join(table.columns)}), got {metric!r}.")
    table = table[table["layer"].notna()]
    traces = []
    for i, step in enumerate(result.steps):
        rows = table[table["step"] == step].sort_values("layer")
        traces.append(go.Scatter(
            x=rows["layer"].astype(int), y=rows[metric], mode="lines+markers", name=step,
            legendgroup=step, line={"color": _color(i)}, text=rows["label"],
            hovertemplate="%{text}: %{y:.4g}<extra>" + step + "</extra>",
        ))
    return traces


def _boundaries(result: WeightComparison) -> list[float]:
    cuts = result.meta.get("cuts") or {}
    marks = [0.5]  # projector | LLM
    if cuts:
        marks += [cuts["mid"] + 0.5, cuts["late"] + 0.5]  # unified index of decoder layer i is i + 1
    if result.meta.get("vision_depths") and sum(result.meta["vision_depths"]):
        marks.insert(0, -0.5)  # vision | projector
    return marks


def _vline(x: float, xref: str, yref: str) -> dict:
    return {"type": "line", "x0": x, "x1": x, "y0": 0, "y1": 1, "xref": xref, "yref": yref,
            "line": {"dash": "dot", "color": "grey", "width": 1}}


def layer_curves(result: WeightComparison, metric: str = "rel_norm") -> go.Figure:
    """Per-layer curves of ``metric`` (a :meth:`by_layer` column), one line per step."""
    fig = go.Figure(_layer_traces(result, metric))
    for x in _boundaries(result):
        fig.add_shape(_vline(x, "x", "y domain"))
    fig.update_layout(
        title=f"{metric} per layer (vision < 0, projector 0, LLM 1..N)",
        xaxis_title="unified layer index", yaxis_title=metric, template="plotly_white",
    )
    return fig


def _region_traces(result: WeightComparison) -> list[go.Bar]:
    table = result.by_region()
    regions = [r for r in REGIONS if r in set(table["region"])]
    traces = []
    for i, step in enumerate(result.steps):
        rows = table[table["step"] == step].set_index("region").reindex(regions)
        traces.append(go.Bar(
            x=regions, y=rows["energy_share"], name=step, legendgroup=step, marker={"color": _color(i)},
            showlegend=False, hovertemplate="%{x}: %{y:.2%}<extra>" + step + "</extra>",
        ))
    return traces


def region_shares(result: WeightComparison) -> go.Figure:
    """Each region's share of every step's total energy (squared Frobenius norm)."""
    fig = go.Figure([t.update(showlegend=True) for t in _region_traces(result)])
    fig.update_layout(
        barmode="group", title="energy share by region", yaxis_title="share of ||delta||^2",
        yaxis_tickformat=".0%", template="plotly_white",
    )
    return fig


def _spectrum_traces(result: WeightComparison) -> list[go.Scatter]:
    frame = result.frame
    frame = frame[frame["spectrum"].map(lambda s: s is not None and len(s) > 0)]
    traces = []
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    for i, step in enumerate(result.steps):
        rows = frame[frame["step"] == step].assign(_approx=frame["svd_mode"] == "randomized")
        colors = {c: j for j, c in enumerate(sorted(rows["component"].unique()))}
        for (component, approx), group in rows.groupby(["component", "_approx"], sort=True):
            j = colors[component]
            label = f"{component} (randomized top-k)" if approx else component  # never averaged with exact ones
            length = max(len(s) for s in group["spectrum"])
            stack = np.full((len(group), length), np.nan)
            for r, values in enumerate(group["spectrum"]):
                stack[r, : len(values)] = np.asarray(values, dtype=float)
            mean = np.nanmean(stack, axis=0)
            traces.append(go.Scatter(
                x=np.arange(1, length + 1), y=mean, mode="lines", name=f"{step} {label}",
                legendgroup=step, showlegend=False, line={"color": _COLORS[j % len(_COLORS)], "dash": dashes[i % 5]},
                opacity=0.5 if approx else 1.0,
                hovertemplate=f"{step} {label} " + "s_%{x}/s_1 = %{y:.3g}<extra></extra>",
            ))
    return traces


def component_spectra(result: WeightComparison) -> go.Figure:
    """Mean normalised top-k spectrum (s_i / s_1) of each component's deltas, per step (line style)."""
    fig = go.Figure([t.update(showlegend=True) for t in _spectrum_traces(result)])
    fig.update_layout(
        title="normalised singular spectra by component (mean over tensors)", xaxis_title="i",
        yaxis_title="s_i / s_1", yaxis_type="log", template="plotly_white",
    )
    return fig


def overview(result: WeightComparison, metric: str = "rel_norm") -> go.Figure:
    """Per-layer curves, energy share by region, and component spectra in one figure."""
    spectra = _spectrum_traces(result)
    rows = 3 if spectra else 2
    titles = [f"{metric} per layer", "energy share by region", "normalised spectra by component (mean)"][:rows]
    fig = make_subplots(rows=rows, cols=1, subplot_titles=titles, vertical_spacing=0.09)
    for trace in _layer_traces(result, metric):
        fig.add_trace(trace, row=1, col=1)
    for trace in _region_traces(result):
        fig.add_trace(trace, row=2, col=1)
    for trace in spectra:
        fig.add_trace(trace, row=3, col=1)
    for x in _boundaries(result):
        fig.add_shape(_vline(x, "x", "y domain"))
    fig.update_xaxes(title_text="unified layer index (vision < 0, projector 0, LLM 1..N)", row=1, col=1)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    fig.update_yaxes(title_text="share of ||delta||^2", tickformat=".0%", row=2, col=1)
    if spectra:
        fig.update_yaxes(title_text="s_i / s_1", type="log", row=3, col=1)
        fig.update_xaxes(title_text="i (line style: step; colour: component)", row=3, col=1)
    fig.update_layout(
        height=360 * rows, barmode="group", template="plotly_white",
        title=f"Weight deltas: {', '.join(result.steps)}",
    )
    return fig
