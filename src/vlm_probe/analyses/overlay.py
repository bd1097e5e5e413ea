"""Per-vision-token values drawn over the original picture.

Each vision token knows its image, tile and (row, col) cell (``TokenLayout.cells``) and each
tile the box of the picture it covers (``TokenLayout.tiles``), so any per-token quantity (a
patching effect, attention mass, a probe score, the logit-lens token) becomes a heatmap over
the image, with the value and the token in the hover text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from PIL import Image

from ..errors import InputError
from ..model.layout import TokenLayout

WHOLE_VIEW = ("view", "base", "global", "thumbnail")


def cell_grid(
    layout: TokenLayout, values: Sequence[float] | np.ndarray, image: int = 0, tile: int | None = None
) -> tuple[np.ndarray, Any, int]:
    """The ``[rows, cols]`` grid of ``values`` (one per vision token) for one tile of one image.

    Args:
        values: aligned with ``layout.spans["vision"]`` (NaN where a token has no value).
        tile: which tile (default: the view covering the whole image).

    Returns:
        ``(grid, tile_grid, tile_index)``; cells without a token are NaN.
    """
    values = np.asarray(values, dtype=float)
    vision = layout.spans["vision"]
    if len(values) != len(vision):
        raise InputError(f"Got {len(values)} values for {len(vision)} vision tokens.")
    tiles = {t: g for (i, t), g in layout.tiles.items() if i == image}
    if not tiles:
        raise InputError(f"This layout has no image {image}.")
    if tile is None:
        whole = [t for t, g in tiles.items() if g.kind in WHOLE_VIEW and g.rows]
        tile = whole[-1] if whole else next(iter(tiles))
    grid_spec = tiles[tile]
    grid = np.full((grid_spec.rows, grid_spec.cols), np.nan)
    for value, cell in zip(values, layout.cells):
        if cell.image == image and cell.tile == tile and cell.row is not None:
            grid[cell.row, cell.col] = value
    return grid, grid_spec, tile


def overlay_figure(
    image: Image.Image,
    layout: TokenLayout,
    values: Sequence[float] | np.ndarray,
    *,
    image_index: int = 0,
    tile: int | None = None,
    labels: Sequence[str] | None = None,
    title: str = "",
    colorscale: str = "Viridis",
    opacity: float = 0.55,
    zmid: float | None = None,
    zrange: tuple[float, float] | None = None,
) -> go.Figure:
    """A heatmap of one value per vision token over the picture it came from.

    Args:
        image: the original PIL image of ``layout``'s image ``image_index``.
        layout: the row's :class:`~vlm_probe.model.layout.TokenLayout`.
        values: one value per vision token, aligned with ``layout.spans["vision"]``.
        labels: optional text per vision token for the hover (e.g. the logit-lens top token).
        zmid: center of a diverging colorscale (e.g. 0 for RL minus IN).
        zrange: fixed ``(min, max)`` of the colour scale (to compare several figures).
    """
    grid, spec, tile_index = cell_grid(layout, values, image_index, tile)
    width, height = image.size
    top, left, bottom, right = spec.box or (0.0, 0.0, 1.0, 1.0)
    x0, x1, y0, y1 = left * width, right * width, top * height, bottom * height
    cw, ch = (x1 - x0) / spec.cols, (y1 - y0) / spec.rows
    xs = x0 + cw * (np.arange(spec.cols) + 0.5)
    ys = y0 + ch * (np.arange(spec.rows) + 0.5)
    text = np.full(grid.shape, "", dtype=object)
    vision = layout.spans["vision"]
    for k, cell in enumerate(layout.cells):
        if cell.image == image_index and cell.tile == tile_index and cell.row is not None:
            label = f"token {vision[k]}" + (f": {labels[k]}" if labels is not None else "")
            text[cell.row, cell.col] = label
    fig = go.Figure()
    fig.add_trace(go.Image(z=np.asarray(image.convert("RGB")), hoverinfo="skip"))
    heat = go.Heatmap(z=grid, x=xs, y=ys, text=text, opacity=opacity, colorscale=colorscale,
                      hovertemplate="%{text}<br>value %{z:.4f}<extra></extra>", zmid=zmid,
                      zmin=zrange[0] if zrange else None, zmax=zrange[1] if zrange else None)
    fig.add_trace(heat)
    fig.update_layout(title=title, template="plotly_white", width=min(720, max(360, width)),
                      height=min(720, max(360, height)) + 60, margin={"l": 20, "r": 20, "t": 60, "b": 20})
    fig.update_xaxes(visible=False, range=[0, width])
    fig.update_yaxes(visible=False, range=[height, 0])
    return fig


def vision_values(layout: TokenLayout, per_position: dict[int, float]) -> np.ndarray:
    """Values aligned with ``layout.spans['vision']`` from a ``{position: value}`` mapping."""
    return np.array([per_position.get(p, np.nan) for p in layout.spans["vision"]], dtype=float)


def overlay_checkpoints(
    batch: Any,
    values: Mapping[str, Any],
    *,
    sample: int = 0,
    image: int = 0,
    difference: tuple[str, str] | None = ("IN", "RL"),
    title: str = "",
) -> dict[str, go.Figure]:
    """One overlay per checkpoint of a per-token quantity, on one colour range, plus the
    difference of two of them on a diverging scale centred at 0.

    Args:
        batch: the prepared batch the values were computed on (it holds the images).
        values: checkpoint name -> ``[batch, seq]`` values (e.g. :func:`token_attention` of
            each checkpoint, a probe score per token).
        difference: ``(a, b)`` adds the figure ``"b - a"`` (skipped when either is absent).

    Returns:
        ``{name: figure}`` for every checkpoint, then ``"b - a"``.
    """
    row = batch.layout[sample]
    picture = batch.rows[sample].images[image]
    per_token = {name: np.asarray(v, dtype=float)[sample, row.spans["vision"]] for name, v in values.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in per_token.values()])
    shared = (float(finite.min()), float(finite.max())) if finite.size else None
    label = f"{title}: " if title else ""
    figures = {name: overlay_figure(picture, row, v, image_index=image, zrange=shared, title=f"{label}{name}")
               for name, v in per_token.items()}
    if difference is not None and all(name in per_token for name in difference):
        a, b = difference
        figures[f"{b} - {a}"] = overlay_figure(picture, row, per_token[b] - per_token[a], image_index=image, zmid=0,
                                               colorscale="RdBu", title=f"{label}{b} minus {a}")
    return figures
