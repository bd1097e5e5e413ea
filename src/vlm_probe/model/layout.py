"""Where everything is in a tokenized VLM input: ``TokenLayout`` (one row) and ``BatchLayout``.

A layout names groups of positions (``vision``, ``image0``, ``system``, ``question``,
``answer``, ``template``, ``text``, ``prompt``, ``last``, ``last_prompt``, ``pad``) so that
any API taking positions can take a group name instead. Each vision token also knows its
image, the tile (sub-view) of that image it belongs to, and its (row, column) cell in that
tile's grid; each tile knows which box of the original picture it covers, so per-token
values can be drawn over the picture.

Positions are absolute indices into the (left-padded) row. With left padding, a layout
shifted by ``k`` extra pad tokens is :meth:`TokenLayout.shifted`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..errors import GroupNameError, InputError, RowIndexError

#: Group names every layout defines (possibly empty), besides ``image{k}``.
STANDARD_GROUPS: tuple[str, ...] = (
    "vision",
    "system",
    "question",
    "answer",
    "template",
    "text",
    "prompt",
    "last",
    "last_prompt",
    "pad",
)


@dataclass(frozen=True)
class TileGrid:
    """One view of an image that the vision tokens of a tile cover.

    ``box`` is ``(top, left, bottom, right)`` as fractions of the original image, or
    ``None`` where the processor does not say which part of the image a tile shows.
    """

    rows: int
    cols: int
    box: tuple[float, float, float, float] | None = (0.0, 0.0, 1.0, 1.0)
    kind: str = "view"  #: "view" (whole image), "tile" (a crop), "base", "global", "thumbnail"


@dataclass(frozen=True)
class VisionCell:
    """The place of one vision token: image index, tile index and (row, col) in the tile grid.

    ``row``/``col`` are ``None`` for tokens with no cell (LLaVA-NeXT newline tokens, a CLS
    token, Mllama's single image token).
    """

    image: int
    tile: int
    row: int | None
    col: int | None


@dataclass(frozen=True)
class TokenLayout:
    """Named position groups and vision-token cells of one row."""

    length: int
    spans: dict[str, tuple[int, ...]]
    cells: tuple[VisionCell, ...] = ()  #: one per position in ``spans['vision']``, same order
    tiles: dict[tuple[int, int], TileGrid] = field(default_factory=dict)
    image_sizes: tuple[tuple[int, int], ...] = ()  #: (height, width) of each image

    # ------------------------------------------------------------------ access

    @property
    def groups(self) -> dict[str, Int[Tensor, " n"]]:
        """Every group as a LongTensor of positions."""
        return {name: torch.tensor(pos, dtype=torch.long) for name, pos in self.spans.items()}

    def positions(self, group: str) -> Int[Tensor, " n"]:
        """Positions of ``group`` (a name from :attr:`spans`)."""
        if group not in self.spans:
            raise InputError(
                f"No token group {group!r} in this layout. Groups: {', '.join(sorted(self.spans))}."
            )
        return torch.tensor(self.spans[group], dtype=torch.long)

    def __getattr__(self, name: str) -> Int[Tensor, " n"]:
        spans = self.__dict__.get("spans")
        if spans is not None and name in spans:
            return torch.tensor(spans[name], dtype=torch.long)
        if spans is None or name.startswith("_"):
            raise AttributeError(name)
        raise GroupNameError(f"No token group {name!r} in this layout; it has {', '.join(sorted(spans))}.")

    def mask(self, group: str) -> Bool[Tensor, " seq"]:
        """Boolean mask over the row's positions."""
        out = torch.zeros(self.length, dtype=torch.bool)
        out[self.positions(group)] = True
        return out

    @property
    def n_images(self) -> int:
        return len(self.image_sizes)

    def cell_of(self, position: int) -> VisionCell:
        """The cell of the vision token at ``position``."""
        vision = self.spans["vision"]
        try:
            return self.cells[vision.index(position)]
        except ValueError:
            raise InputError(f"Position {position} is not a vision token.") from None

    # ------------------------------------------------------------------ transforms

    def shifted(self, k: int) -> TokenLayout:
        """The same layout after ``k`` more left-padding tokens."""
        if k == 0:
            return self
        spans = {name: tuple(p + k for p in pos) for name, pos in self.spans.items()}
        spans["pad"] = tuple(range(k)) + spans["pad"]
        return replace(self, length=self.length + k, spans=spans)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(pos)}" for name, pos in self.spans.items() if pos and name != "pad")
        return f"TokenLayout(length={self.length}, {sizes})"


def check_row(index: int, n: int) -> int:
    """``index`` (negative counts from the end) if it names one of ``n`` rows, else :class:`RowIndexError`."""
    index = int(index)
    if not -n <= index < n:
        raise RowIndexError(f"Row {index} is outside this batch of {n} row(s); valid rows are 0..{n - 1} "
                            f"(or -{n}..-1).")
    return index


class BatchLayout(Sequence[TokenLayout]):
    """Layouts of every row of a batch.

    ``layout.vision`` gives the positions of a group when they are the same in every row
    (one prompt template, same-size images), else raises and points to :meth:`mask`
    (``[batch, seq]`` booleans) or ``layout[i].vision``.
    """

    def __init__(self, rows: Sequence[TokenLayout]) -> None:
        self.rows = tuple(rows)
        self._masks: dict[str, Tensor] = {}  # the rows never change: each group's mask is built once

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return BatchLayout(self.rows[index])
        return self.rows[check_row(index, len(self.rows))]

    def __iter__(self) -> Iterator[TokenLayout]:
        return iter(self.rows)

    @property
    def length(self) -> int:
        return self.rows[0].length if self.rows else 0

    def names(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [n for n in row.spans if n not in names]
        return names

    def uniform(self, group: str) -> bool:
        first = self.rows[0].spans.get(group)
        return all(row.spans.get(group) == first for row in self.rows)

    def positions(self, group: str) -> Int[Tensor, " n"]:
        """Positions of ``group``, which must be identical in every row."""
        if not self.rows:
            raise InputError("Empty batch has no positions.")
        if all(group not in row.spans for row in self.rows):
            raise InputError(f"No token group {group!r} in this batch's layout; it has {', '.join(self.names())}.")
        if not self.uniform(group):
            raise InputError(
                f"Token group {group!r} sits at different positions in different rows of this batch. "
                f"Use batch.layout.mask({group!r}) (a [batch, seq] boolean mask) or batch.layout[i].{group} "
                "for one row."
            )
        return self.rows[0].positions(group)

    def __getattr__(self, name: str) -> Int[Tensor, " n"]:
        if name.startswith("_") or name == "rows":
            raise AttributeError(name)
        rows = self.__dict__.get("rows", ())
        if any(name in row.spans for row in rows):
            return self.positions(name)
        raise GroupNameError(f"No token group {name!r} in this batch's layout; it has {', '.join(self.names())}.")

    @property
    def groups(self) -> dict[str, Int[Tensor, " n"]]:
        """Groups whose positions agree across rows."""
        return {name: self.positions(name) for name in self.names() if self.uniform(name)}

    def mask(self, group: str) -> Bool[Tensor, "batch seq"]:
        """``[batch, seq]`` mask of ``group`` (rows may differ); a fresh tensor each call."""
        if group not in self._masks:
            self._masks[group] = torch.stack([row.mask(group) for row in self.rows])
        return self._masks[group].clone()

    def __repr__(self) -> str:
        return f"BatchLayout(rows={len(self.rows)}, length={self.length}, groups={self.names()})"


# ----------------------------------------------------------------------------- vision cells


def square_cells(n: int, image: int, tile: int = 0) -> tuple[list[VisionCell], TileGrid]:
    """Cells of ``n`` tokens laid out row-major on a square grid (a leading CLS token allowed)."""
    side = math.isqrt(n)
    cls = 0
    if side * side != n and math.isqrt(n - 1) ** 2 == n - 1:
        cls, side = 1, math.isqrt(n - 1)
    if side * side + cls != n:
        side = 0
    cells = [VisionCell(image, tile, None, None)] * cls
    if side == 0:  # not a square grid: keep order, no cells
        return cells + [VisionCell(image, tile, None, None)] * (n - cls), TileGrid(0, 0, None)
    cells += [VisionCell(image, tile, k // side, k % side) for k in range(side * side)]
    return cells, TileGrid(side, side)


def grid_cells(rows: int, cols: int, image: int, tile: int = 0, frames: int = 1) -> list[VisionCell]:
    """Row-major cells of a ``rows x cols`` grid, repeated for each frame."""
    return [VisionCell(image, tile, r, c) for _ in range(frames) for r in range(rows) for c in range(cols)]


def anyres_cells(n: int, side: int, image: int, hw: tuple[int, int]) -> tuple[list[VisionCell], dict[int, TileGrid]]:
    """LLaVA-NeXT/OneVision packing: a base view (side x side), then the high-resolution grid
    unpadded to the image's aspect ratio with one newline token closing each row."""
    cells = grid_cells(side, side, image, 0)
    tiles = {0: TileGrid(side, side, kind="base")}
    rest = n - side * side
    if rest <= 0:
        return cells[:n], tiles
    if rest == 1:
        return cells + [VisionCell(image, 1, None, None)], tiles
    height, width = hw
    best: tuple[float, int, int] | None = None
    for rows in range(1, rest + 1):
        if rest % rows:
            continue
        cols = rest // rows - 1
        if cols < 1:
            continue
        score = abs(math.log((cols / rows) / (width / height)))
        if best is None or score < best[0]:
            best = (score, rows, cols)
    if best is None:
        return cells + [VisionCell(image, 1, None, None)] * rest, tiles
    _, rows, cols = best
    for r in range(rows):
        cells += [VisionCell(image, 1, r, c) for c in range(cols)] + [VisionCell(image, 1, None, None)]
    tiles[1] = TileGrid(rows, cols, kind="tile")
    return cells, tiles
