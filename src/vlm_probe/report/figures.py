"""Figures of the report, drawn from saved tables.

One helper draws every curve with a confidence band (:func:`band_figure`); every figure with a
layer axis uses integer ticks on the unified index labelled as the tables are (``V-1``, ``P``,
``L3``); every panel has axis titles; colours never repeat within a figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..arch import unified_index_label
from ..stats import bootstrap

TEMPLATE = "plotly_white"
LAYER_AXIS = "layer (unified index: vision < 0, projector P = 0, decoder L1..LN)"
#: 20 distinct colours (D3's ten, then ten darker or lighter others); a figure with more series
#: than this is split into panels instead of reusing a colour.
PALETTE: tuple[str, ...] = tuple(qualitative.D3) + ("#000000", "#0b3d91", "#9a6324", "#469990", "#800000",
                                                    "#808000", "#f032e6", "#4363d8", "#a9a9a9", "#3cb44b")


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[k : k + 2], 16) for k in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def layer_ticks(fig: go.Figure, layers: Sequence[int], *, row: int | None = None, col: int | None = None) -> None:
    """Integer ticks at every unified layer index (thinned past 32 layers), labelled like the tables."""
    values = sorted({int(v) for v in layers if pd.notna(v)})
    step = max(1, int(np.ceil(len(values) / 32)))
    shown = values[::step]
    fig.update_xaxes(tickmode="array", tickvals=shown, ticktext=[unified_index_label(v) for v in shown],
                     row=row, col=col)


def finish(fig: go.Figure, *, title: str, height: int = 420, legend_title: str | None = None) -> go.Figure:
    """The report's look: white template, a readable title, the legend below the plot."""
    n_legend = sum(1 for t in fig.data if t.showlegend is not False)
    fig.update_layout(template=TEMPLATE, title={"text": title, "font": {"size": 15}}, height=height,
                      margin={"t": 70, "b": 60 + 18 * max(0, (n_legend - 1) // 4)},
                      legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0, "title": legend_title,
                              "font": {"size": 12}})
    return fig


def band_figure(
    frame: pd.DataFrame,
    *,
    y: str,
    low: str | None,
    high: str | None,
    series: str | None,
    title: str,
    y_title: str,
    x: str = "unified_layer",
    x_title: str = LAYER_AXIS,
    baselines: dict[str, tuple[float, float, float]] | None = None,
    band_label: str = "95% CI",
    y_range: Sequence[float] | None = None,
    layer_axis: bool = True,
) -> go.Figure:
    """Curves of ``y`` over ``x`` (one per ``series``), each with its ``[low, high]`` band, and
    optional dashed baselines ``{name: (value, low, high)}`` in the series' colour."""
    fig = go.Figure()
    groups = [("", frame)] if series is None else list(frame.groupby(series, sort=False))
    for i, (name, part) in enumerate(groups):
        part = part.sort_values(x)
        xs, c = list(part[x]), color(i)
        label = str(name) if name != "" else y_title
        if low is not None and high is not None and part[low].notna().any():
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=list(part[high]) + list(part[low])[::-1], fill="toself",
                                     mode="lines", fillcolor=_rgba(c, 0.18), line={"width": 0}, hoverinfo="skip",
                                     name=f"{label} {band_label}", legendgroup=label, showlegend=False))
        fig.add_trace(go.Scatter(x=xs, y=part[y], mode="lines+markers", name=label, legendgroup=label,
                                 line={"color": c}, customdata=[unified_index_label(int(v)) for v in xs] if layer_axis
                                 else None, hovertemplate=("%{customdata}: " if layer_axis else "%{x}: ")
                                 + "%{y:.4g}<extra>" + label + "</extra>"))
        if baselines and str(name) in baselines:
            value, lo, hi = baselines[str(name)]
            fig.add_hline(y=value, line={"dash": "dash", "color": c, "width": 1.5},
                          annotation_text=f"{label} without ablation: {value:.3g} [{lo:.3g}, {hi:.3g}]",
                          annotation_position="top left" if i % 2 == 0 else "bottom left",
                          annotation_font={"color": c, "size": 11})
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=f"{y_title} ({band_label} band)" if low is not None else y_title)
    if y_range is not None:
        fig.update_yaxes(range=list(y_range))
    if layer_axis and len(frame):
        layer_ticks(fig, frame[x])
    return finish(fig, title=title)


def bootstrap_by_layer(frame: pd.DataFrame, value: str, keys: Sequence[str], *, x: str = "unified_layer",
                       n_resamples: int = 500) -> pd.DataFrame:
    """Mean of ``value`` per ``keys`` and layer with a 95% bootstrap interval over its rows."""
    rows = []
    for key, part in frame.groupby([*keys, x], sort=True):
        est = bootstrap(part[value].dropna().to_numpy(dtype=float), n_resamples=n_resamples)
        rows.append({**dict(zip([*keys, x], key if isinstance(key, tuple) else (key,))), value: est.value,
                     "low": est.low, "high": est.high, "n": est.n})
    return pd.DataFrame(rows)


def bars_with_ci(frame: pd.DataFrame, *, x: str, y: str, low: str, high: str, series: str, title: str,
                 x_title: str, y_title: str) -> go.Figure:
    """Grouped bars with 95% error bars, one colour per series."""
    fig = go.Figure()
    for i, (name, part) in enumerate(frame.groupby(series, sort=False)):
        fig.add_bar(name=str(name), x=part[x], y=part[y], marker={"color": color(i)},
                    error_y={"type": "data", "symmetric": False, "array": part[high] - part[y],
                             "arrayminus": part[y] - part[low]})
    fig.update_layout(barmode="group")
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=f"{y_title} (bars: 95% CI)")
    return finish(fig, title=title, height=440)


def spectra_figure(spectra: pd.DataFrame) -> go.Figure:
    """Mean normalised singular spectrum of each component's update, one panel per step, one
    distinct colour per component (the same colour in every panel)."""
    steps = list(dict.fromkeys(spectra["step"]))
    components = sorted(set(spectra["component"]))
    fig = make_subplots(rows=1, cols=len(steps), subplot_titles=[f"update {s}" for s in steps],
                        horizontal_spacing=0.08)
    for col, step in enumerate(steps, start=1):
        for i, component in enumerate(components):
            part = spectra[(spectra["step"] == step) & (spectra["component"] == component)].sort_values("i")
            if part.empty:
                continue
            fig.add_trace(go.Scatter(x=part["i"], y=part["value"], mode="lines", name=component,
                                     legendgroup=component, showlegend=col == 1, line={"color": color(i)},
                                     hovertemplate=f"{step} {component}: " + "s_%{x}/s_1 = %{y:.3g}<extra></extra>"),
                          row=1, col=col)
        fig.update_xaxes(title_text="singular value index i", row=1, col=col)
        fig.update_yaxes(title_text="s_i / s_1 (mean over tensors)", type="log", row=1, col=col)
    positive = spectra["value"][spectra["value"] > 0]
    if len(positive):  # one range for every panel, so they compare at a glance
        fig.update_yaxes(range=[float(np.log10(positive.min())) - 0.05, 0.05])
    return finish(fig, title="Normalised singular spectra of the weight updates, by component", height=460,
                  legend_title="component")


def check_figure(fig: go.Figure) -> list[str]:
    """Problems a reader would hit: a panel without axis titles, the default grey template, a
    layer axis without integer ticks. Empty when the figure is fine."""
    problems = []
    layout = fig.layout
    if layout.template is None or layout.template.layout.plot_bgcolor not in ("white", "rgb(255,255,255)", "#fff"):
        problems.append("not on the white template")
    heatmap = any(t.type == "heatmap" for t in fig.data)  # a picture: its axes are pixels
    used = {f"{k}axis{(getattr(t, k + 'axis', None) or k)[1:]}" for t in fig.data for k in ("x", "y")}
    for name in sorted(used | {k for k in layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))}):
        axis = layout[name]
        if axis.visible is False or heatmap:
            continue
        if not (axis.title and axis.title.text):
            problems.append(f"{name} has no title")
        if axis.title and axis.title.text and "unified index" in axis.title.text:
            if axis.tickmode != "array" or any(int(v) != v for v in axis.tickvals or ()):
                problems.append(f"{name}: layer axis without integer ticks")
    return problems


def as_figure(spec: Any, *, min_width: int = 640) -> go.Figure:
    """A figure from a saved plotly JSON string (figures drawn over images keep their own data),
    wide enough for its title."""
    import plotly.io as pio

    fig = pio.from_json(spec)
    fig.update_layout(template=TEMPLATE, width=max(min_width, fig.layout.width or 0))
    return fig
