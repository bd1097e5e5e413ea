"""Which image, tile and grid cell each vision token of a row belongs to, per family grid kind."""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from ..arch import FamilySpec
from .layout import TileGrid, VisionCell, anyres_cells, grid_cells, square_cells

_TILE_MARKER = re.compile(r"<row_(\d+)_col_(\d+)>")


def _runs(positions: list[int]) -> list[list[int]]:
    """Split sorted positions into maximal runs of consecutive integers."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def vision_cells(
    spec: FamilySpec,
    config: Any,
    processor: Any,
    input_ids: Tensor,
    per_image: list[list[int]],
    encoding: dict[str, Tensor],
    image_sizes: list[tuple[int, int]],
) -> tuple[list[VisionCell], dict[tuple[int, int], TileGrid]]:
    """Cells for the vision tokens of one (unpadded) row.

    Args:
        input_ids: ``[seq]`` ids of the row.
        per_image: the vision-token positions of each image, in order.
        encoding: the row's processor output (``image_grid_thw`` etc.).
        image_sizes: (height, width) of each image.

    Returns:
        One :class:`VisionCell` per vision token (ordered like the concatenation of
        ``per_image``) and the :class:`TileGrid` of every (image, tile).
    """
    cells: list[VisionCell] = []
    tiles: dict[tuple[int, int], TileGrid] = {}
    vision_config = getattr(config, "vision_config", None)
    for image, positions in enumerate(per_image):
        n = len(positions)
        if spec.grid == "qwen":
            t, h, w = (int(x) for x in encoding["image_grid_thw"][image])
            merge = int(getattr(vision_config, "spatial_merge_size", 2))
            rows, cols = h // merge, w // merge
            cells += grid_cells(rows, cols, image, 0, frames=t)[:n]
            tiles[(image, 0)] = TileGrid(rows, cols)
        elif spec.grid == "square":
            found, grid = square_cells(n, image)
            cells += found
            tiles[(image, 0)] = grid
        elif spec.grid == "anyres":
            side = int(vision_config.image_size) // int(vision_config.patch_size)
            found, grids = anyres_cells(n, side, image, image_sizes[image])
            cells += found
            tiles.update({(image, k): g for k, g in grids.items()})
        elif spec.grid == "tiles":
            found, grids = _tiled_cells(processor, input_ids, positions, image)
            cells += found
            tiles.update(grids)
        else:  # "single": one token per image, no grid
            cells += [VisionCell(image, 0, None, None)] * n
            tiles[(image, 0)] = TileGrid(1, 1)
    return cells, tiles


def _tiled_cells(
    processor: Any, input_ids: Tensor, positions: list[int], image: int
) -> tuple[list[VisionCell], dict[tuple[int, int], TileGrid]]:
    """Idefics3/SmolVLM (runs separated by ``<row_i_col_j>`` / ``<global-img>`` markers) and
    InternVL (one run of equal-size tiles, the last a thumbnail when there are several)."""
    seq_len = getattr(processor, "image_seq_len", None) or getattr(processor, "image_seq_length", None)
    runs = _runs(positions)
    chunks: list[tuple[list[int], int | None]] = []  # (positions, position of the marker before)
    for run in runs:
        if seq_len and len(run) > seq_len and len(run) % seq_len == 0:
            chunks += [(run[i : i + seq_len], None) for i in range(0, len(run), seq_len)]
        else:
            chunks.append((run, run[0] - 1))
    tokenizer = processor.tokenizer
    markers: list[tuple[int, int] | None] = []
    for _, before in chunks:
        marker = None
        if before is not None and before >= 0:
            match = _TILE_MARKER.fullmatch(tokenizer.convert_ids_to_tokens(int(input_ids[before])) or "")
            if match:
                marker = (int(match.group(1)) - 1, int(match.group(2)) - 1)
        markers.append(marker)
    n_rows = max((m[0] + 1 for m in markers if m), default=0)
    n_cols = max((m[1] + 1 for m in markers if m), default=0)
    cells: list[VisionCell] = []
    tiles: dict[tuple[int, int], TileGrid] = {}
    for tile, ((chunk, _), marker) in enumerate(zip(chunks, markers)):
        found, grid = square_cells(len(chunk), image, tile)
        cells += found
        if marker is not None:
            r, c = marker
            box = (r / n_rows, c / n_cols, (r + 1) / n_rows, (c + 1) / n_cols)
            tiles[(image, tile)] = TileGrid(grid.rows, grid.cols, box, kind="tile")
        elif len(chunks) > 1 and tile == len(chunks) - 1:
            tiles[(image, tile)] = TileGrid(grid.rows, grid.cols, kind="global")
        elif len(chunks) > 1:
            tiles[(image, tile)] = TileGrid(grid.rows, grid.cols, None, kind="tile")
        else:
            tiles[(image, tile)] = grid
    return cells, tiles
