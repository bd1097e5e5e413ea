"""Task families over shape scenes, mirroring the published probes, answered with short traces.

Families (an item's ``family``, the harness's ``category``):

* ``perception``: read the image (counting, colour and shape of a cell, which row/column).
* ``v2r``: vision-to-reasoning: read counts from the image, then one reasoning step
  (arithmetic or a comparison over counts).
* ``text``: text-only arithmetic and comparison (no image).
* ``described``: the ``v2r`` questions asked about a text description of the scene, with a
  blank image (the M_v2r condition), so that a model trained here can be scored on it.

Every answer ends with "the answer is X" (X one word), which the evaluation harness's grader
reads. Questions that need reasoning (v2r, described, text) carry a
:class:`~vlm_probe.testbed.traces.Working` and are answered with its trace
("2 red shapes . 2 plus 3 = 5 . the answer is 5"); perception questions about one cell or one
shape first name what they look at ("row 2 column 3 : red circle . the answer is red"), counts
answer at once ("the answer is 4"). :attr:`Item.response` is the correct response; the cold
start's demonstrations may carry mistakes (:func:`~vlm_probe.testbed.traces.demonstration`).

Swap pairs (:func:`swap_pair`) put one prompt over two same-size scenes whose answers differ;
source scenes are minimal edits of their targets (one shape added, recoloured or moved).

Every question, answer and description uses words of the zoo's word-level tokenizer
(:data:`vlm_probe.testbed.tokenizer.BASE_WORDS`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image

from ..errors import InputError
from .scenes import BACKGROUND, CELL, COLORS, GRID, SHAPES, Scene, Shape, blank_image, random_scene, render
from .traces import Count, Step, Working

FAMILIES: tuple[str, ...] = ("perception", "v2r", "text", "described")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
#: Blank-image colours used when training ``described`` items (the harness may use any of them).
BLANK_COLORS: tuple[tuple[int, int, int], ...] = (BACKGROUND, (255, 255, 255), (128, 128, 128))

#: How a question is solved: a Working (a trace), or the words naming what a perception answer reads ("" for none).
Solution = Union[Working, str]
QA = tuple[str, str, Solution]
SceneTask = Callable[[np.random.Generator, Scene], Union[QA, None]]
TextTask = Callable[[np.random.Generator], QA]


def respond(answer: str, solution: Solution) -> str:
    """The correct response: a trace for a :class:`Working`, else ``"<lead> . the answer is X"``."""
    if isinstance(solution, Working):
        return solution.trace().text
    return f"{solution} . the answer is {answer}" if solution else f"the answer is {answer}"


@dataclass(frozen=True)
class Item:
    """One question with its answer, how it is solved, and what the model sees.

    ``image`` is ``"scene"`` (the rendered scene), ``"blank"`` (a uniform image of colour
    ``blank_color``, with the scene described in the question) or ``"none"`` (text only).
    ``answer`` is the one-word gold answer; ``solution`` a :class:`Working` (reasoning
    questions) or the words a perception answer names first.
    """

    id: str
    family: str
    task: str
    question: str
    answer: str
    scene: Scene | None = None
    image: str = "scene"
    blank_color: tuple[int, int, int] = BACKGROUND
    solution: Solution = ""

    def picture(self) -> Image.Image | None:
        """The image the model is shown (None for text-only items)."""
        if self.image == "scene":
            assert self.scene is not None
            return render(self.scene)
        if self.image == "blank":
            side = (self.scene.grid if self.scene is not None else GRID) * CELL
            return blank_image(side, color=self.blank_color)
        return None

    @property
    def response(self) -> str:
        """The correct response (trace or lead, then "the answer is X")."""
        return respond(self.answer, self.solution)

    @property
    def working(self) -> Working | None:
        return self.solution if isinstance(self.solution, Working) else None

    @property
    def key(self) -> str:
        """Identity of the question (scene and question text), used to hold items out of training."""
        return f"{self.scene.key() if self.scene is not None else '-'}|{self.question}"


def _solved(question: str, working: Working) -> QA:
    return question, working.answer, working


# ----------------------------------------------------------------------------- perception


def _count(rng: np.random.Generator, scene: Scene) -> QA:
    return "how many shapes are there ?", str(len(scene)), ""


def _count_color(rng: np.random.Generator, scene: Scene) -> QA:
    color = _pick(rng, list(COLORS))
    return f"how many {color} shapes are there ?", str(scene.count(color=color)), ""


def _count_shape(rng: np.random.Generator, scene: Scene) -> QA:
    shape = _pick(rng, list(SHAPES))
    return f"how many {PLURAL[shape]} are there ?", str(scene.count(shape=shape)), ""


def _cell(s: Shape) -> str:
    return f"row {s.row} column {s.column} : {s.kind}"


def _color_at(rng: np.random.Generator, scene: Scene) -> QA | None:
    if not len(scene):
        return None
    s = _pick(rng, list(scene))
    return f"what color is the shape in row {s.row} column {s.column} ?", s.color, _cell(s)


def _shape_at(rng: np.random.Generator, scene: Scene) -> QA | None:
    if not len(scene):
        return None
    s = _pick(rng, list(scene))
    return f"what shape is in row {s.row} column {s.column} ?", s.shape, _cell(s)


def _unique(scene: Scene) -> list[Shape]:
    return [s for s in scene if scene.count(color=s.color, shape=s.shape) == 1]


def _row_of(rng: np.random.Generator, scene: Scene) -> QA | None:
    unique = _unique(scene)
    if not unique:
        return None
    s = _pick(rng, unique)
    return f"which row is the {s.kind} in ?", str(s.row), f"{s.kind} : row {s.row} column {s.column}"


def _column_of(rng: np.random.Generator, scene: Scene) -> QA | None:
    unique = _unique(scene)
    if not unique:
        return None
    s = _pick(rng, unique)
    return f"which column is the {s.kind} in ?", str(s.column), f"{s.kind} : row {s.row} column {s.column}"


# ----------------------------------------------------------------------------- vision-to-reasoning


def _count_plus(rng: np.random.Generator, scene: Scene) -> QA:
    k = int(rng.integers(1, 6))
    working = Working((Count("shapes", len(scene)),), (Step("plus", "read0", k),))
    return _solved(f"how many shapes are there plus {k} ?", working)


def _color_plus(rng: np.random.Generator, scene: Scene) -> QA:
    color = _pick(rng, list(COLORS))
    k = int(rng.integers(1, 6))
    working = Working((Count(f"{color} shapes", scene.count(color=color)),), (Step("plus", "read0", k),))
    return _solved(f"how many {color} shapes are there plus {k} ?", working)


def _count_not(rng: np.random.Generator, scene: Scene) -> QA:
    color = _pick(rng, list(COLORS))
    working = Working(
        (Count("shapes", len(scene)), Count(f"{color} shapes", scene.count(color=color))),
        (Step("minus", "read0", "read1"),),
    )
    return _solved(f"how many shapes are not {color} ?", working)


def _more_color(rng: np.random.Generator, scene: Scene) -> QA:
    a, b = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    working = Working(
        (Count(f"{a} shapes", scene.count(color=a)), Count(f"{b} shapes", scene.count(color=b))),
        (Step("more", "read0", "read1"),),
    )
    return _solved(f"are there more {a} shapes than {b} shapes ?", working)


def _more_shape(rng: np.random.Generator, scene: Scene) -> QA:
    a, b = (str(s) for s in rng.choice(list(SHAPES), size=2, replace=False))
    working = Working(
        (Count(PLURAL[a], scene.count(shape=a)), Count(PLURAL[b], scene.count(shape=b))),
        (Step("more", "read0", "read1"),),
    )
    return _solved(f"are there more {PLURAL[a]} than {PLURAL[b]} ?", working)


# ----------------------------------------------------------------------------- text only


def _add(rng: np.random.Generator) -> QA:
    a, b = (int(x) for x in rng.integers(0, 10, size=2))
    return _solved(f"what is {a} plus {b} ?", Working((), (Step("plus", a, b),)))


def _sub(rng: np.random.Generator) -> QA:
    a = int(rng.integers(0, 13))
    b = int(rng.integers(0, a + 1))
    return _solved(f"what is {a} minus {b} ?", Working((), (Step("minus", a, b),)))


def _add3(rng: np.random.Generator) -> QA:
    a, b, c = (int(x) for x in rng.integers(0, 6, size=3))
    return _solved(f"what is {a} plus {b} plus {c} ?", Working((), (Step("plus", a, b), Step("plus", "step0", c))))


def _more(rng: np.random.Generator) -> QA:
    a, b = (int(x) for x in rng.integers(0, 13, size=2))
    return _solved(f"is {a} more than {b} ?", Working((), (Step("more", a, b),)))


PERCEPTION: dict[str, SceneTask] = {
    "count": _count,
    "count_color": _count_color,
    "count_shape": _count_shape,
    "color_at": _color_at,
    "shape_at": _shape_at,
    "row_of": _row_of,
    "column_of": _column_of,
}
V2R: dict[str, SceneTask] = {
    "count_plus": _count_plus,
    "color_plus": _color_plus,
    "count_not": _count_not,
    "more_color": _more_color,
    "more_shape": _more_shape,
}
TEXT: dict[str, TextTask] = {"add": _add, "sub": _sub, "add3": _add3, "more": _more}
#: Tasks of each family (``described`` asks the ``v2r`` questions about a description).
TASKS: dict[str, tuple[str, ...]] = {
    "perception": tuple(PERCEPTION),
    "v2r": tuple(V2R),
    "text": tuple(TEXT),
    "described": tuple(V2R),
}


def _pick(rng: np.random.Generator, options: Sequence):  # type: ignore[no-untyped-def]
    return options[int(rng.integers(len(options)))]


@dataclass(frozen=True)
class SceneOptions:
    """How scenes are drawn: number of shapes per scene."""

    min_shapes: int = 1
    max_shapes: int = 6
    grid: int = GRID


def make_item(
    rng: np.random.Generator,
    family: str,
    task: str | None = None,
    *,
    item_id: str = "",
    scenes: SceneOptions = SceneOptions(),
    blank_colors: Sequence[tuple[int, int, int]] = (BACKGROUND,),
) -> Item:
    """Draw one item of ``family`` (and ``task``, else a uniformly chosen task of the family)."""
    if family not in TASKS:
        raise InputError(f"Unknown task family {family!r}; known: {', '.join(TASKS)}.")
    task = task or _pick(rng, TASKS[family])
    if task not in TASKS[family]:
        raise InputError(f"Family {family!r} has no task {task!r}; its tasks: {', '.join(TASKS[family])}.")
    if family == "text":
        question, answer, solution = TEXT[task](rng)
        return Item(item_id, family, task, question, answer, None, "none", solution=solution)
    make = PERCEPTION[task] if family == "perception" else V2R[task]
    while True:
        scene = random_scene(rng, grid=scenes.grid, min_shapes=scenes.min_shapes, max_shapes=scenes.max_shapes)
        qa = make(rng, scene)
        if qa is not None:
            break
    question, answer, solution = qa
    if family == "described":
        color = tuple(blank_colors[int(rng.integers(len(blank_colors)))])
        return Item(item_id, family, task, f"{scene.describe()} {question}", answer, scene, "blank", color, solution)
    return Item(item_id, family, task, question, answer, scene, "scene", solution=solution)


Mixture = tuple[tuple[str, float], ...]


def parse_mixture(mixture: Mixture) -> tuple[list[tuple[str, str | None]], np.ndarray]:
    """Mixture entries (``"perception"`` or ``"perception/count"``) -> (family, task) and weights."""
    entries: list[tuple[str, str | None]] = []
    weights = []
    for name, weight in mixture:
        family, _, task = name.partition("/")
        if family not in TASKS or (task and task not in TASKS[family]):
            raise InputError(
                f"Unknown mixture entry {name!r}: use a family ({', '.join(TASKS)}) or family/task, "
                f"e.g. 'perception/color_at'."
            )
        if weight < 0:
            raise InputError(f"Mixture weight of {name!r} is negative ({weight}).")
        entries.append((family, task or None))
        weights.append(float(weight))
    total = sum(weights)
    if not entries or total <= 0:
        raise InputError("A mixture needs at least one entry with a positive weight.")
    return entries, np.asarray(weights) / total


@dataclass
class ItemStream:
    """An endless, seeded stream of training items drawn from a mixture.

    Items whose :attr:`Item.key` is in ``exclude`` (a held-out set) are skipped.
    """

    seed: int
    mixture: Mixture
    scenes: SceneOptions = SceneOptions()
    exclude: frozenset[str] = frozenset()
    blank_colors: tuple[tuple[int, int, int], ...] = BLANK_COLORS
    prefix: str = "train"
    _count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._entries, self._weights = parse_mixture(self.mixture)
        self._rng = np.random.default_rng(self.seed)

    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        while True:
            family, task = self._entries[int(self._rng.choice(len(self._entries), p=self._weights))]
            item = make_item(
                self._rng,
                family,
                task,
                item_id=f"{self.prefix}-{self._count}",
                scenes=self.scenes,
                blank_colors=self.blank_colors,
            )
            if item.key not in self.exclude:
                self._count += 1
                return item

    def take(self, n: int) -> list[Item]:
        return [next(self) for _ in range(n)]


def held_out_items(
    seed: int, counts: dict[str, int], *, scenes: SceneOptions = SceneOptions()
) -> list[Item]:
    """A fixed evaluation set: ``counts[family]`` items per family, tasks balanced in turn."""
    rng = np.random.default_rng(seed)
    items = []
    for family in FAMILIES:
        tasks = TASKS[family]
        for i in range(counts.get(family, 0)):
            task = tasks[i % len(tasks)]
            items.append(make_item(rng, family, task, item_id=f"{family}-{task}-{i:05d}", scenes=scenes))
    return items


# ----------------------------------------------------------------------------- swap pairs

SWAP_TASKS: tuple[str, ...] = ("counting", "recognition", "grounding", "arithmetic")


@dataclass(frozen=True)
class SwapPair:
    """One prompt over two same-size scenes with different answers (a vision-token swap probe)."""

    id: str
    task: str
    prompt: str
    target: Scene
    source: Scene
    target_answer: str
    source_answer: str


def _empty_cells(scene: Scene) -> list[tuple[int, int]]:
    return [(r, c) for r in range(1, scene.grid + 1) for c in range(1, scene.grid + 1) if scene.at(r, c) is None]


def swap_pair(
    rng: np.random.Generator, task: str, *, item_id: str = "", scenes: SceneOptions = SceneOptions()
) -> SwapPair:
    """Draw a swap pair: the source scene is a minimal edit of the target that changes the answer.

    * ``counting``: "how many shapes are there ?"; the source has one shape more or fewer.
    * ``recognition``: "what color is the shape in row r column c ?"; the source recolours it.
    * ``grounding``: "which row is the <colour> <shape> in ?"; the source moves it to another row.
    * ``arithmetic``: "how many shapes are there plus k ?"; the source has one shape more or fewer.
    """
    if task not in SWAP_TASKS:
        raise InputError(f"Unknown swap task {task!r}; known: {', '.join(SWAP_TASKS)}.")
    while True:
        target = random_scene(rng, grid=scenes.grid, min_shapes=scenes.min_shapes, max_shapes=scenes.max_shapes)
        made = _swap_edit(rng, task, target, scenes)
        if made is not None:
            prompt, source, target_answer, source_answer = made
            if target_answer != source_answer:
                return SwapPair(item_id, task, prompt, target, source, target_answer, source_answer)


def _swap_edit(
    rng: np.random.Generator, task: str, target: Scene, scenes: SceneOptions
) -> tuple[str, Scene, str, str] | None:
    shapes = list(target)
    if task in ("counting", "arithmetic"):
        grow = len(shapes) < scenes.max_shapes and (len(shapes) <= scenes.min_shapes or rng.random() < 0.5)
        if grow:
            empty = _empty_cells(target)
            r, c = empty[int(rng.integers(len(empty)))]
            shapes.append(Shape(r, c, _pick(rng, list(COLORS)), _pick(rng, list(SHAPES))))
        else:
            shapes.pop(int(rng.integers(len(shapes))))
        source = target.with_shapes(shapes)
        if task == "counting":
            return "how many shapes are there ?", source, str(len(target)), str(len(source))
        k = int(rng.integers(1, 6))
        return f"how many shapes are there plus {k} ?", source, str(len(target) + k), str(len(source) + k)
    if task == "recognition":
        i = int(rng.integers(len(shapes)))
        s = shapes[i]
        color = _pick(rng, [c for c in COLORS if c != s.color])
        shapes[i] = Shape(s.row, s.column, color, s.shape)
        prompt = f"what color is the shape in row {s.row} column {s.column} ?"
        return prompt, target.with_shapes(shapes), s.color, color
    # grounding: move a unique shape to an empty cell of another row
    unique = _unique(target)
    if not unique:
        return None
    s = _pick(rng, unique)
    moves = [(r, c) for r, c in _empty_cells(target) if r != s.row]
    if not moves:
        return None
    r, c = moves[int(rng.integers(len(moves)))]
    shapes[shapes.index(s)] = Shape(r, c, s.color, s.shape)
    return f"which row is the {s.kind} in ?", target.with_shapes(shapes), str(s.row), str(r)


def swap_pairs(seed: int, n_per_task: int, *, scenes: SceneOptions = SceneOptions()) -> list[SwapPair]:
    """``n_per_task`` pairs of each swap task, seeded."""
    rng = np.random.default_rng(seed)
    return [
        swap_pair(rng, task, item_id=f"swap-{task}-{i:05d}", scenes=scenes)
        for task in SWAP_TASKS
        for i in range(n_per_task)
    ]
