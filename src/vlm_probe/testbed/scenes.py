"""Seeded scenes of coloured shapes in a grid, and their renderer.

A :class:`Scene` is a set of :class:`Shape` objects, at most one per cell of a
``grid x grid`` board. :func:`render` draws it as an RGB image of ``grid * cell`` pixels a
side (42 x 42 by default: a 3 x 3 grid of 14-pixel cells, so a Qwen-VL tower with patch 7
and a 2 x 2 merge sees one vision token per cell; ``grid=4`` gives 56 x 56 and 16 tokens). Drawing is exact (no anti-aliasing): every
pixel of a shape has its palette colour and every other pixel is the background.

Rows and columns are numbered from 1, top-left first, as the questions say them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from jaxtyping import Bool, UInt8
from PIL import Image

from ..errors import InputError

#: Palette: saturated colours far apart in RGB, so a shape's colour is never ambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (235, 210, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
GRID = 3
CELL = 14


@dataclass(frozen=True, order=True)
class Shape:
    """One shape on the board (``row``/``column`` from 1)."""

    row: int
    column: int
    color: str
    shape: str

    @property
    def kind(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Shapes on a ``grid x grid`` board, at most one per cell, kept sorted by cell."""

    shapes: tuple[Shape, ...]
    grid: int = GRID

    def __post_init__(self) -> None:
        cells = [(s.row, s.column) for s in self.shapes]
        if len(set(cells)) != len(cells):
            raise InputError(f"Two shapes share a cell: {sorted(cells)}.")
        for s in self.shapes:
            if not (1 <= s.row <= self.grid and 1 <= s.column <= self.grid):
                raise InputError(f"{s} lies outside a {self.grid} x {self.grid} grid.")
            if s.color not in COLORS or s.shape not in SHAPES:
                raise InputError(f"Unknown colour or shape in {s}; colours {list(COLORS)}, shapes {list(SHAPES)}.")
        object.__setattr__(self, "shapes", tuple(sorted(self.shapes)))

    def __iter__(self) -> Iterator[Shape]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def at(self, row: int, column: int) -> Shape | None:
        """The shape in a cell, or None."""
        for s in self.shapes:
            if (s.row, s.column) == (row, column):
                return s
        return None

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        """Number of shapes, optionally of one colour and/or one shape."""
        return sum(1 for s in self.shapes if color in (None, s.color) and shape in (None, s.shape))

    def describe(self) -> str:
        """A text description that determines the scene (words every tiny tokenizer knows).

        ``"the image has a red circle in row 1 column 2 , a blue square in row 3 column 1 ."``
        """
        if not self.shapes:
            return "the image has no shapes ."
        parts = [f"a {s.kind} in row {s.row} column {s.column}" for s in self.shapes]
        return "the image has " + " , ".join(parts) + " ."

    def key(self) -> str:
        """A compact identity string (equal scenes have equal keys)."""
        return ";".join(f"{s.row}{s.column}{s.color[0]}{s.shape[0]}" for s in self.shapes)

    def with_shapes(self, shapes: list[Shape]) -> Scene:
        return Scene(tuple(shapes), self.grid)


def random_scene(
    rng: np.random.Generator, *, grid: int = GRID, min_shapes: int = 1, max_shapes: int = 6
) -> Scene:
    """A scene with a uniform number of shapes in ``[min_shapes, max_shapes]`` on random cells."""
    n = int(rng.integers(min_shapes, max_shapes + 1))
    cells = rng.choice(grid * grid, size=n, replace=False)
    colors = list(COLORS)
    shapes = [
        Shape(
            row=int(c) // grid + 1,
            column=int(c) % grid + 1,
            color=colors[int(rng.integers(len(colors)))],
            shape=SHAPES[int(rng.integers(len(SHAPES)))],
        )
        for c in cells
    ]
    return Scene(tuple(shapes), grid)


@lru_cache(maxsize=None)
def shape_mask(shape: str, cell: int = CELL) -> Bool[np.ndarray, "cell cell"]:
    """Which pixels of a ``cell x cell`` square a shape covers (2-pixel margin)."""
    margin = 2
    inner = cell - 2 * margin
    y, x = np.mgrid[0:cell, 0:cell].astype(float)
    centre = (cell - 1) / 2
    inside = (y >= margin) & (y < cell - margin) & (x >= margin) & (x < cell - margin)
    if shape == "square":
        return inside
    if shape == "circle":
        radius = inner / 2
        return (y - centre) ** 2 + (x - centre) ** 2 <= radius**2
    if shape == "triangle":  # apex up, base on the bottom edge of the inner square
        height = (y - margin + 0.5) / inner  # 0 at the top of the inner square, 1 at the bottom
        return inside & (np.abs(x - centre) <= height * inner / 2)
    raise InputError(f"Unknown shape {shape!r}; known: {SHAPES}.")


def render_array(
    scene: Scene, *, cell: int = CELL, background: tuple[int, int, int] = BACKGROUND
) -> UInt8[np.ndarray, "height width 3"]:
    """The scene's pixels, ``[grid * cell, grid * cell, 3]`` uint8."""
    side = scene.grid * cell
    pixels = np.empty((side, side, 3), dtype=np.uint8)
    pixels[:] = background
    for s in scene:
        top, left = (s.row - 1) * cell, (s.column - 1) * cell
        block = pixels[top : top + cell, left : left + cell]
        block[shape_mask(s.shape, cell)] = COLORS[s.color]
    return pixels


def render(scene: Scene, *, cell: int = CELL, background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """The scene as an RGB image of ``grid * cell`` pixels a side."""
    return Image.fromarray(render_array(scene, cell=cell, background=background), mode="RGB")


def blank_image(side: int = GRID * CELL, color: tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """A uniform image of the scenes' size (the "blank image" of M_vis / M_v2r)."""
    return Image.new("RGB", (side, side), color)
