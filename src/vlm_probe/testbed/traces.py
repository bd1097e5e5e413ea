"""Short reasoning traces: what an answer to a v2r, described or text question looks like.

A question that needs reasoning carries a :class:`Working`: the counts read from the image
(or from the description) and the arithmetic or comparison done on them. :meth:`Working.trace`
writes it out in the zoo tokenizer's words and ends with the answer, which the evaluation
harness's grader reads after "the answer is"::

    how many red shapes are there plus 3 ?
    -> 2 red shapes . 2 plus 3 = 5 . the answer is 5
    are there more circles than squares ?
    -> 1 circle , 3 squares . 1 is not more than 3 . the answer is no
    what is 1 plus 2 plus 4 ?
    -> 1 plus 2 = 3 . 3 plus 4 = 7 . the answer is 7

Demonstrations for the supervised cold start may carry a mistake, as traces distilled from a
stronger model do (:func:`demonstration`): one count misread by one, or one step's result off by
one (a comparison flipped); every later step and the answer follow the mistake, so a wrong
demonstration is consistent with itself and only its outcome is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np

from ..errors import InputError

Operator = Literal["plus", "minus", "more"]
#: An operand: a literal number, or a reference to a count read (``"read0"``) or a step's result (``"step0"``).
Operand = Union[int, str]
ErrorKind = Literal["read", "step"]

#: Enough new tokens for the longest trace (two reads, a step, the answer) and its stop token;
#: the testbed's data manifest records it as the generation budget.
MAX_NEW_TOKENS = 24


@dataclass(frozen=True)
class Count:
    """One number read from the image or its description: ``value`` of ``noun`` (plural form)."""

    noun: str
    value: int

    def text(self, value: int | None = None) -> str:
        """``"2 red shapes"``, ``"1 red shape"``."""
        value = self.value if value is None else value
        return f"{value} {self.noun if value != 1 else singular(self.noun)}"


@dataclass(frozen=True)
class Step:
    """``left <operator> right``; ``more`` gives yes/no, ``plus``/``minus`` a number."""

    operator: Operator
    left: Operand
    right: Operand


def singular(noun: str) -> str:
    """``"red shapes"`` -> ``"red shape"`` (the last word loses its plural ``s``)."""
    head, _, last = noun.rpartition(" ")
    last = last[:-1] if last.endswith("s") else last
    return f"{head} {last}".strip()


@dataclass(frozen=True)
class Worked:
    """A trace as written: its text, the answer it ends with, and whether it holds a mistake."""

    text: str
    answer: str
    error: ErrorKind | None = None


@dataclass(frozen=True)
class Working:
    """How a question is solved: counts to read, then steps on them; the last step is the answer."""

    reads: tuple[Count, ...]
    steps: tuple[Step, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise InputError("A working needs at least one step.")

    def solve(self, *, reads: tuple[int, ...] | None = None, slip: tuple[int, int] | None = None) -> list[int | bool]:
        """Every step's result, from the true counts or from ``reads``; ``slip=(i, delta)``
        changes step ``i``'s result by ``delta`` (a comparison flips) before later steps use it."""
        values = [c.value for c in self.reads] if reads is None else list(reads)
        results: list[int | bool] = []

        def operand(x: Operand) -> int:
            if isinstance(x, int):
                return x
            kind, index = x[:4], int(x[4:])
            return int(values[index] if kind == "read" else results[index])

        for i, step in enumerate(self.steps):
            left, right = operand(step.left), operand(step.right)
            result: int | bool
            if step.operator == "plus":
                result = left + right
            elif step.operator == "minus":
                result = left - right
            else:
                result = left > right
            if slip is not None and slip[0] == i:
                result = (not result) if isinstance(result, bool) else max(0, result + slip[1])
            results.append(result)
        return results

    @property
    def answer(self) -> str:
        return answer_text(self.solve()[-1])

    def trace(self, *, reads: tuple[int, ...] | None = None, slip: tuple[int, int] | None = None) -> Worked:
        """The trace text (from the true counts unless ``reads``/``slip`` inject a mistake)."""
        values = [c.value for c in self.reads] if reads is None else list(reads)
        results = self.solve(reads=tuple(values), slip=slip)

        def operand(x: Operand) -> int:
            if isinstance(x, int):
                return x
            return int(values[int(x[4:])] if x.startswith("read") else results[int(x[4:])])

        parts = []
        if self.reads:
            parts.append(" , ".join(c.text(v) for c, v in zip(self.reads, values)))
        for step, result in zip(self.steps, results):
            left, right = operand(step.left), operand(step.right)
            if step.operator == "more":
                parts.append(f"{left} is {'' if result else 'not '}more than {right}")
            else:
                parts.append(f"{left} {step.operator} {right} = {result}")
        answer = answer_text(results[-1])
        parts.append(f"the answer is {answer}")
        error: ErrorKind | None = None
        if slip is not None:
            error = "step"
        elif reads is not None and tuple(reads) != tuple(c.value for c in self.reads):
            error = "read"
        return Worked(" . ".join(parts), answer, error)


def answer_text(result: int | bool) -> str:
    return ("yes" if result else "no") if isinstance(result, bool) else str(result)


def demonstration(working: Working, rng: np.random.Generator, error_rate: float) -> Worked:
    """A trace for the cold start; with probability ``error_rate`` it holds one mistake that
    changes the answer (a count misread by one, or a step's result off by one / flipped)."""
    if error_rate <= 0 or rng.random() >= error_rate:
        return working.trace()
    truth = working.answer
    for _ in range(20):  # draw a mistake that changes the outcome ("2 > 0" survives a misread)
        if working.reads and rng.random() < 0.5:
            index = int(rng.integers(len(working.reads)))
            values = [c.value for c in working.reads]
            delta = int(rng.choice([-1, 1])) if values[index] > 0 else 1
            values[index] += delta
            worked = working.trace(reads=tuple(values))
        else:
            index = int(rng.integers(len(working.steps)))
            worked = working.trace(slip=(index, int(rng.choice([-1, 1]))))
        if worked.answer != truth:
            return worked
    return working.trace()
