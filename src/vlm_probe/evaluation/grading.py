"""Judging a response against the gold answer: numbers, math, choices, boxes, text.

:func:`grade` picks the kind of answer from the gold value (``kind="auto"``) and returns a
:class:`Grade` that records what was extracted and what decided. Math equivalence uses the
``math-verify`` package as documented: ``verify(gold, prediction)``, gold first (the
function is not symmetric), both parsed as LaTeX. Plain numbers are compared by value with an
explicit tolerance before any symbolic check, so ``1.5`` never equals ``5``.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .answers import (
    LETTERS,
    _norm_text,
    extract_answer,
    extract_choice,
    last_number,
    parse_box,
    parse_number,
)

AnswerKind = Literal["auto", "number", "math", "choice", "box", "text"]
#: An optional grader of last resort: ``judge(question, gold, response) -> correct``.
Judge = Callable[[str, str, str], bool]
Box = tuple[float, float, float, float]

_MATHY = re.compile(r"[\\^_{}=+\-*/()\d]")
_LATEX = re.compile(r"\\[A-Za-z]|[\^{}]")


@dataclass(frozen=True)
class Grade:
    """The verdict on one response.

    Attributes:
        correct: the verdict.
        kind: the answer kind used (number, math, choice, box, text).
        method: what decided: ``number``, ``math``, ``text``, ``choice``, ``iou``, ``judge``
            or ``no_answer`` (nothing gradable was found).
        extracted: the answer read from the response (a string; a letter for choices, a box
            as ``x1,y1,x2,y2``).
        source: where the answer span came from (``answer_tag``, ``boxed``, ``answer_is``, ``full``).
        score: the IoU for boxes, else None.
    """

    correct: bool
    kind: str
    method: str
    extracted: str
    source: str
    score: float | None = None


def is_box(value: Any) -> bool:
    """A sequence of four numbers."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def infer_kind(answer: Any, choices: Sequence[str] | None = None) -> AnswerKind:
    """The answer kind a gold value calls for (what ``kind="auto"`` resolves to)."""
    if choices:
        return "choice"
    if is_box(answer):
        return "box"
    text = str(answer)
    if parse_number(text) is not None and not re.search(r"[A-Za-z]{2,}", text.replace("frac", "")):
        return "number"
    if _MATHY.search(text):
        return "math"
    return "text"


def numbers_close(gold: float, pred: float, *, rel_tol: float = 1e-6, abs_tol: float = 1e-9) -> bool:
    """``|pred - gold| <= max(rel_tol * max(|gold|, |pred|), abs_tol)``."""
    return math.isclose(gold, pred, rel_tol=rel_tol, abs_tol=abs_tol)


def _as_latex(text: str) -> str:
    """Delimit bare LaTeX with ``$...$``; text that has its own delimiters is left to math-verify."""
    text = text.strip()
    delimited = any(mark in text for mark in ("$", "\\(", "\\[", "\\boxed"))
    return text if delimited else f"${text}$"


def math_equal(gold: str, prediction: str, *, timeout_s: int = 5) -> bool:
    """Whether ``prediction`` equals ``gold`` as a math expression (``math-verify``).

    Both strings are parsed as LaTeX (``$...$`` is added when missing, so ``3\\sqrt{2}`` is
    read whole rather than as its first number), then ``verify(gold, prediction)`` is called
    with gold first, as its documentation requires. Outside the main thread the signal-based
    timeouts of ``math-verify`` cannot work and are switched off.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(_as_latex(gold), extraction_config=config, parsing_timeout=timeout)
    pred_parsed = parse(_as_latex(prediction), extraction_config=config, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def text_equal(gold: str, prediction: str) -> bool:
    """Equality after lower-casing and dropping punctuation, articles and extra spaces."""
    return _norm_text(gold) == _norm_text(prediction) and bool(_norm_text(gold))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``x1, y1, x2, y2`` boxes (0 for degenerate boxes)."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    if ax2 <= ax1 or ay2 <= ay1 or bx2 <= bx1 or by2 <= by1:
        return 0.0
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _gold_choice(answer: Any, choices: Sequence[str]) -> int | None:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(choices) else None
    text = str(answer).strip()
    letter = re.fullmatch(r"\(?([A-Z])\)?\.?", text)
    if letter and letter.group(1) in LETTERS[: len(choices)]:
        return LETTERS.index(letter.group(1))
    normed = [_norm_text(c) for c in choices]
    return normed.index(_norm_text(text)) if _norm_text(text) in normed else None


def _grade_rules(
    response: str, answer: Any, kind: AnswerKind, choices: Sequence[str] | None,
    rel_tol: float, abs_tol: float, iou_threshold: float,
) -> Grade:
    extraction = extract_answer(response)
    span, source = extraction.text, extraction.source
    if kind == "choice":
        if not choices:
            raise ValueError("kind='choice' needs the list of choices.")
        gold = _gold_choice(answer, choices)
        if gold is None:
            raise ValueError(f"The gold answer {answer!r} is neither a letter, an index nor one of {list(choices)}.")
        picked = extract_choice(response, tuple(choices))
        if picked is None:
            return Grade(False, kind, "no_answer", span, source)
        return Grade(picked == gold, kind, "choice", LETTERS[picked], source)
    if kind == "box":
        gold_box = answer if is_box(answer) else parse_box(str(answer))
        if gold_box is None:
            raise ValueError(f"The gold answer {answer!r} is not a box (x1, y1, x2, y2).")
        box = parse_box(response)
        if box is None:
            return Grade(False, kind, "no_answer", span, source, 0.0)
        iou = box_iou(gold_box, box)
        return Grade(iou >= iou_threshold, kind, "iou", ",".join(f"{v:g}" for v in box), source, iou)
    gold_text = str(answer).strip()
    if kind == "number":
        gold_value = parse_number(gold_text)
        if gold_value is None:
            raise ValueError(f"The gold answer {answer!r} is not a number; use kind='math' or 'text'.")
        value = parse_number(span)
        if value is None and source == "full" and not _LATEX.search(span):
            value = last_number(span)  # free text ("There are 3 items."): its last number
        if value is not None:
            ok = numbers_close(gold_value, value, rel_tol=rel_tol, abs_tol=abs_tol)
            return Grade(ok, kind, "number", f"{value:g}", source)
        if span and math_equal(gold_text, span):
            return Grade(True, kind, "math", span, source)
        return Grade(False, kind, "no_answer" if not span else "math", span, source)
    if kind == "math":
        gold_value, value = parse_number(gold_text), parse_number(span)
        if gold_value is not None and value is not None:
            ok = numbers_close(gold_value, value, rel_tol=rel_tol, abs_tol=abs_tol)
            return Grade(ok, kind, "number", span, source)
        if not span:
            return Grade(False, kind, "no_answer", span, source)
        if gold_text.replace(" ", "") == span.replace(" ", ""):
            return Grade(True, kind, "math", span, source)
        return Grade(math_equal(gold_text, span), kind, "math", span, source)
    if kind == "text":
        return Grade(text_equal(gold_text, span), kind, "text" if span else "no_answer", span, source)
    raise ValueError(f"Unknown answer kind {kind!r}; use one of auto, number, math, choice, box, text.")


def grade(
    response: str,
    answer: Any,
    *,
    kind: AnswerKind = "auto",
    choices: Sequence[str] | None = None,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    iou_threshold: float = 0.5,
    judge: Judge | None = None,
    question: str = "",
) -> Grade:
    """Judge ``response`` against the gold ``answer``.

    Args:
        response: the model's generated text.
        answer: the gold answer: a string or number; a letter, index or option text when
            ``choices`` are given; four numbers ``x1, y1, x2, y2`` for a box; or a list of
            acceptable answers (any one matching counts).
        kind: ``"auto"`` infers it (:func:`infer_kind`); or number, math, choice, box, text.
        choices: the options of a multiple-choice question.
        rel_tol: relative tolerance for numbers (:func:`numbers_close`).
        abs_tol: absolute tolerance for numbers.
        iou_threshold: a box is correct when its IoU with the gold box reaches this.
        judge: optional ``judge(question, gold, response) -> bool`` (e.g. an LLM grader),
            asked only when the rules say wrong; off by default.
        question: passed to the judge.

    Returns:
        A :class:`Grade`.
    """
    if isinstance(answer, (list, tuple)) and not is_box(answer):
        if not answer:
            raise ValueError("An empty list of acceptable answers cannot be graded.")
        grades = [
            grade(response, a, kind=kind, choices=choices, rel_tol=rel_tol, abs_tol=abs_tol,
                  iou_threshold=iou_threshold)
            for a in answer
        ]
        best = next((g for g in grades if g.correct), grades[0])
        if best.correct or judge is None:
            return best
        verdict = bool(judge(question, " | ".join(map(str, answer)), response))
        return Grade(verdict, best.kind, "judge", best.extracted, best.source, best.score)
    resolved = infer_kind(answer, choices) if kind == "auto" else kind
    result = _grade_rules(response, answer, resolved, choices, rel_tol, abs_tol, iou_threshold)
    if result.correct or judge is None:
        return result
    verdict = bool(judge(question, str(answer), response))
    return Grade(verdict, result.kind, "judge", result.extracted, result.source, result.score)
