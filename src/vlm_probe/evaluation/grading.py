"""Judging a response against the gold answer: the compare stage and :func:`grade`.

:func:`grade` runs a pipeline of named stages; every :class:`Grade` says which one decided
(``stage``), how (``method``) and why (``reason``), and shows the answer span it read
(``extracted``) and the two values it compared, as exact text (``predicted``, ``expected``).

1. **extract** the answer span (:func:`~vlm_probe.evaluation.answers.extract_answer`);
2. **normalise** it (:func:`~vlm_probe.evaluation.answers.normalize_span`);
3. **read** a value of the answer's kind from it (``read_number``, ``read_yes_no``,
   ``read_choice``, ``read_box``, ``expression_of``, ``text_candidates`` in
   :mod:`~vlm_probe.evaluation.answers`); no value, a hedge or a negation decide here;
4. **compare** by kind, the kind coming from the gold value (:func:`infer_kind`):

   * ``choice``: the option index;
   * ``yesno``: yes or no;
   * ``integer``: exact equality, unless a tolerance is asked for (``rel_tol``/``abs_tol``);
   * ``real``: ``|p - g| <= max(rel_tol * max(|p|, |g|), abs_tol)``, 1e-6 and 1e-9 by default
     (a number written as a percent also matches as a fraction: ``75%`` is 75 and 0.75);
   * ``math``: ``math-verify`` with the gold first, as its documentation requires, and only
     on a span that is an expression (never a sentence: words would become symbols);
   * ``box``: IoU against the gold box, correct from ``iou_threshold`` on;
   * ``text``: equality after lower-casing and dropping punctuation and articles;
5. **judge** (optional): ``judge(response, gold, question=...)``, asked only when the rules
   say wrong.

Every function here takes the response (or prediction) first and the gold second; where two
strings could be confused the arguments are keyword-only (``math_equal(prediction=...,
gold=...)``).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Literal

from ..errors import GradingError
from .answers import (
    LETTERS,
    Box,
    Extraction,
    Reading,
    _norm_words,
    extract_answer,
    expression_of,
    format_exact,
    inequality_to_interval,
    normalize_span,
    parse_number,
    parse_yes_no,
    read_box,
    read_choice,
    read_number,
    read_yes_no,
    right_hand_side,
    text_candidates,
)

AnswerKind = Literal["auto", "number", "integer", "real", "math", "choice", "yesno", "box", "text"]
KINDS = ("number", "integer", "real", "math", "choice", "yesno", "box", "text")
#: An optional grader of last resort: ``judge(response, gold, *, question) -> correct``.
Judge = Callable[..., bool]
Stage = Literal["extract", "read", "compare", "judge"]
#: The version of the grading rules, recorded by runs: rows graded by other rules are not resumed.
GRADER_VERSION = 2
#: Tolerances of ``real`` answers when none are given (integers compare exactly).
REAL_REL_TOL = 1e-6
REAL_ABS_TOL = 1e-9

_MATHY = re.compile(r"[\\^_{}=+\-*/()<>\d]")


@dataclass(frozen=True)
class Grade:
    """The verdict on one response, with what decided it.

    Attributes:
        correct: the verdict.
        kind: the answer kind compared: choice, yesno, integer, real, math, box or text.
        method: how it was decided: the comparison (``choice``, ``yesno``, ``integer``,
            ``real``, ``math``, ``iou``, ``text``), ``judge``, ``no_answer`` (nothing of the
            kind was found) or ``hedge`` (the answer named several values).
        stage: the pipeline stage that decided: ``extract``, ``read``, ``compare`` or ``judge``.
        reason: a sentence saying what decided, beginning with the stage.
        extracted: the answer span, as extracted from the response.
        source: where the span came from (``answer_tag``, ``boxed``, ``answer_phrase``, ``full``).
        predicted: the value read from the span, as exact text (None if none).
        expected: the gold value it was compared with, as exact text.
        score: the IoU for boxes, else None.
    """

    correct: bool
    kind: str
    method: str
    stage: str
    reason: str
    extracted: str
    source: str
    predicted: str | None = None
    expected: str | None = None
    score: float | None = None


# ----------------------------------------------------------------------------- kinds and gold values


def is_box(value: Any) -> bool:
    """A sequence of four numbers."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def gold_number(gold: Any) -> Fraction | None:
    """A gold number as an exact Fraction (``0.1`` is 1/10, not the nearest double); None if not a number."""
    if isinstance(gold, bool):
        return None
    if isinstance(gold, (int, Fraction)):
        return Fraction(gold)
    if isinstance(gold, float):
        return Fraction(repr(gold)) if math.isfinite(gold) else None
    return parse_number(str(gold)) if isinstance(gold, str) else None


def _number_kind(value: Fraction) -> Literal["integer", "real"]:
    return "integer" if value.denominator == 1 else "real"


def infer_kind(gold: Any, choices: Sequence[str] | None = None) -> str:
    """The answer kind a gold value calls for (what ``kind="auto"`` resolves to).

    Options given -> ``choice``; four numbers -> ``box``; yes/no (or a bool) -> ``yesno``;
    a number (digits, words, fraction, percent) -> ``integer`` or ``real`` by its value;
    LaTeX or operators -> ``math``; anything else -> ``text``.
    """
    if choices:
        return "choice"
    if is_box(gold):
        return "box"
    if parse_yes_no(gold) is not None:
        return "yesno"
    value = gold_number(gold)
    if value is not None:
        return _number_kind(value)
    if _MATHY.search(str(gold)):
        return "math"
    return "text"


def _gold_choice(gold: Any, choices: Sequence[str]) -> int:
    if isinstance(gold, int) and not isinstance(gold, bool):
        if 0 <= gold < len(choices):
            return gold
    else:
        reading = read_choice(str(gold), choices)
        if reading.found and reading.how in ("whole", "only", "head"):
            assert reading.value is not None
            return reading.value
    raise GradingError(f"The gold answer {gold!r} is neither a letter, an index nor one of {list(choices)}.")


# ----------------------------------------------------------------------------- comparators (stage 4)


def numbers_close(*, prediction: float | Fraction, gold: float | Fraction, rel_tol: float = REAL_REL_TOL,
                  abs_tol: float = REAL_ABS_TOL) -> bool:
    """``|prediction - gold| <= max(rel_tol * max(|prediction|, |gold|), abs_tol)``, computed exactly."""
    p = prediction if isinstance(prediction, Fraction) else Fraction(repr(float(prediction)))
    g = gold if isinstance(gold, Fraction) else Fraction(repr(float(gold)))
    return abs(p - g) <= max(Fraction(rel_tol) * max(abs(p), abs(g)), Fraction(abs_tol))


def text_equal(*, prediction: str, gold: str) -> bool:
    """Equality after lower-casing and dropping punctuation, articles and extra spaces."""
    normed = _norm_words(gold)
    return bool(normed) and _norm_words(prediction) == normed


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


def _as_latex(text: str) -> str:
    """Delimit bare LaTeX with ``$...$``; text that has its own delimiters is left to math-verify."""
    text = text.strip()
    delimited = any(mark in text for mark in ("$", "\\(", "\\[", "\\boxed"))
    return text if delimited else f"${text}$"


def math_equal(*, prediction: str, gold: str, timeout_s: int = 5) -> bool:
    """Whether ``prediction`` equals ``gold`` as a math expression (``math-verify``).

    Both are parsed as LaTeX (``$...$`` added when missing, so ``3\\sqrt{2}`` is read whole
    rather than as its first number), then ``verify(gold, prediction)`` is called with the
    gold first, as its documentation requires. Give it expressions, not sentences. Outside
    the main thread the signal-based timeouts of ``math-verify`` cannot work and are off.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    gold_parsed = parse(_as_latex(gold), extraction_config=config, parsing_timeout=timeout)
    pred_parsed = parse(_as_latex(prediction), extraction_config=config, parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


# ----------------------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class _Options:
    rel_tol: float | None
    abs_tol: float | None
    iou_threshold: float


def _verdict(extraction: Extraction, kind: str, *, correct: bool, method: str, stage: str, reason: str,
             predicted: str | None = None, expected: str | None = None, score: float | None = None) -> Grade:
    return Grade(correct, kind, method, stage, f"{stage}: {reason}", extraction.text, extraction.source, predicted,
                 expected, score)


def _unread(extraction: Extraction, kind: str, reading: Reading[Any], expected: str) -> Grade:
    """The verdict when stage 3 found no value: nothing there, a hedge or a negation."""
    if not extraction.text.strip():
        reason = ("the answer phrase has nothing after it (cut off?)" if extraction.source == "answer_phrase"
                  else "the response is empty" if extraction.source == "full" else f"the {extraction.source} is empty")
        return _verdict(extraction, kind, correct=False, method="no_answer", stage="extract", reason=reason,
                        expected=expected)
    method = "hedge" if reading.how == "hedge" else "no_answer"
    return _verdict(extraction, kind, correct=False, method=method, stage="read", reason=reading.note or "no answer",
                    predicted=None, expected=expected)


def _compare_number(extraction: Extraction, gold: Any, kind: str, options: _Options) -> Grade:
    gold_value = gold_number(gold)
    if gold_value is None:
        raise GradingError(f"The gold answer {gold!r} is not a number; use kind='math' or kind='text'.")
    kind = _number_kind(gold_value) if kind == "number" else kind
    expected = format_exact(gold_value)
    reading = read_number(extraction.text)
    if reading.value is None:
        if reading.how == "none":
            expression = expression_of(extraction.text, marked=extraction.marked)
            if expression.value is not None and _MATHY.search(expression.value) and re.search(
                    r"[\\^+\-*/]|\d\s*\(", expression.value):
                ok = math_equal(prediction=right_hand_side(expression.value), gold=expected)
                return _verdict(extraction, kind, correct=ok, method="math", stage="compare",
                                reason=f"math-verify (gold first) says {expression.value!r} "
                                       f"{'equals' if ok else 'differs from'} {expected}",
                                predicted=expression.value, expected=expected)
        return _unread(extraction, kind, reading, expected)
    value = reading.value
    pred_pct = bool(re.search(r"(?:%|percent)$", reading.text.strip()))
    gold_pct = isinstance(gold, str) and bool(re.search(r"(?:%|percent)$", gold.strip()))
    predicted = format_exact(value) + ("%" if pred_pct else "")
    expected += "%" if gold_pct else ""
    # a percent on either side may also be read as a fraction: 75% == 0.75
    pairs = [(value, gold_value)] + [(value / 100, gold_value)] * pred_pct + [(value, gold_value / 100)] * gold_pct
    tolerance = options.rel_tol is not None or options.abs_tol is not None
    if kind == "integer" and not tolerance:
        ok = any(p == g for p, g in pairs)
        rule = "exact (integer gold, no tolerance asked for)"
    else:
        rel = options.rel_tol if options.rel_tol is not None else (REAL_REL_TOL if kind == "real" else 0.0)
        absolute = options.abs_tol if options.abs_tol is not None else (REAL_ABS_TOL if kind == "real" else 0.0)
        ok = any(numbers_close(prediction=p, gold=g, rel_tol=rel, abs_tol=absolute) for p, g in pairs)
        rule = f"rel_tol={rel!r}, abs_tol={absolute!r}"
    return _verdict(extraction, kind, correct=ok, method=kind, stage="compare",
                    reason=f"{predicted} {'==' if ok else '!='} {expected}, {rule} (read {reading.how}: "
                           f"{reading.text!r})",
                    predicted=predicted, expected=expected)


def _compare_yes_no(extraction: Extraction, gold: Any, kind: str, options: _Options) -> Grade:
    gold_value = parse_yes_no(gold)
    if gold_value is None:
        raise GradingError(f"The gold answer {gold!r} is not yes or no.")
    expected = "yes" if gold_value else "no"
    reading = read_yes_no(extraction.text)
    if reading.value is None:
        return _unread(extraction, "yesno", reading, expected)
    predicted = "yes" if reading.value else "no"
    ok = reading.value == gold_value
    return _verdict(extraction, "yesno", correct=ok, method="yesno", stage="compare",
                    reason=f"{predicted} {'==' if ok else '!='} {expected} (read {reading.how}: {reading.text!r})",
                    predicted=predicted, expected=expected)


def _compare_choice(extraction: Extraction, gold: Any, choices: Sequence[str] | None) -> Grade:
    if not choices:
        raise GradingError("kind='choice' needs the list of choices.")
    gold_index = _gold_choice(gold, choices)
    expected = LETTERS[gold_index]
    reading = read_choice(extraction.text, choices)
    if reading.value is None:
        return _unread(extraction, "choice", reading, expected)
    predicted = LETTERS[reading.value]
    ok = reading.value == gold_index
    return _verdict(extraction, "choice", correct=ok, method="choice", stage="compare",
                    reason=f"option {predicted} {'==' if ok else '!='} {expected} (read {reading.how}: "
                           f"{reading.text!r})",
                    predicted=predicted, expected=expected)


def _box_text(box: Sequence[float]) -> str:
    return "[" + ", ".join(format_exact(Fraction(repr(float(v)))) for v in box) + "]"


def _compare_box(extraction: Extraction, gold: Any, response: str, options: _Options) -> Grade:
    gold_box: Box | None = tuple(float(v) for v in gold) if is_box(gold) else None  # type: ignore[assignment]
    if gold_box is None:
        gold_box = read_box(str(gold)).value
    if gold_box is None:
        raise GradingError(f"The gold answer {gold!r} is not a box (x1, y1, x2, y2).")
    expected = _box_text(gold_box)
    reading = read_box(extraction.text, response)
    if reading.value is None:
        verdict = _unread(extraction, "box", reading, expected)
        return replace(verdict, score=0.0)
    iou = box_iou(reading.value, gold_box)
    ok = iou >= options.iou_threshold
    predicted = _box_text(reading.value)
    return _verdict(extraction, "box", correct=ok, method="iou", stage="compare",
                    reason=f"IoU {round(iou, 6)!r} {'>=' if ok else '<'} {options.iou_threshold!r} "
                           f"({predicted} vs {expected})",
                    predicted=predicted, expected=expected, score=iou)


def _compare_math(extraction: Extraction, gold: Any, options: _Options) -> Grade:
    gold_text = str(gold).strip()
    if not gold_text:
        raise GradingError("An empty gold answer cannot be graded.")
    expected = inequality_to_interval(right_hand_side(normalize_span(gold_text)))
    reading = expression_of(extraction.text, marked=extraction.marked)
    if reading.value is None:
        return _unread(extraction, "math", reading, expected)
    predicted = inequality_to_interval(right_hand_side(normalize_span(reading.value)))
    if predicted.replace(" ", "") == expected.replace(" ", ""):
        return _verdict(extraction, "math", correct=True, method="math", stage="compare",
                        reason=f"{predicted!r} is the gold {expected!r} as written", predicted=predicted,
                        expected=expected)
    gold_value, value = parse_number(expected), parse_number(predicted)
    if gold_value is not None and value is not None:
        return _compare_number(Extraction(predicted, extraction.source), gold_value,
                               _number_kind(gold_value), options)
    ok = math_equal(prediction=predicted, gold=expected)
    return _verdict(extraction, "math", correct=ok, method="math", stage="compare",
                    reason=f"math-verify (gold first) says {predicted!r} {'equals' if ok else 'differs from'} "
                           f"{expected!r}",
                    predicted=predicted, expected=expected)


def _compare_text(extraction: Extraction, gold: Any) -> Grade:
    expected = _norm_words(str(gold))
    if not expected:
        raise GradingError(f"The gold answer {gold!r} has no words to compare.")
    phrases = text_candidates(extraction.text, marked=extraction.marked)
    if not phrases:
        return _unread(extraction, "text", Reading(None, note="no text"), expected)
    for phrase in phrases:
        if _norm_words(phrase) == expected:
            after = extraction.text.split(phrase, 1)[-1] if phrase in extraction.text else ""
            if re.match(r"^\W*\(?\s*or\b", after, re.I):  # "red (or maybe blue)"
                return _verdict(extraction, "text", correct=False, method="hedge", stage="read",
                                reason=f"{phrase!r} is followed by an alternative ('or')", expected=expected)
            return _verdict(extraction, "text", correct=True, method="text", stage="compare",
                            reason=f"{_norm_words(phrase)!r} == {expected!r} (read from {phrase!r})",
                            predicted=_norm_words(phrase), expected=expected)
    predicted = _norm_words(phrases[-1] if len(phrases) > 1 else phrases[0])
    return _verdict(extraction, "text", correct=False, method="text", stage="compare",
                    reason=f"no phrase of the answer equals {expected!r} (tried {[_norm_words(p) for p in phrases]})",
                    predicted=predicted, expected=expected)


def _grade_one(response: str, gold: Any, kind: str, choices: Sequence[str] | None, options: _Options) -> Grade:
    resolved = infer_kind(gold, choices) if kind == "auto" else kind
    if resolved not in KINDS:
        raise GradingError(f"Unknown answer kind {kind!r}; use auto or one of {', '.join(KINDS)}.")
    extraction = extract_answer(response)
    if resolved == "choice":
        return _compare_choice(extraction, gold, choices)
    if resolved == "box":
        return _compare_box(extraction, gold, response, options)
    if resolved in ("number", "integer", "real"):
        return _compare_number(extraction, gold, resolved, options)
    if resolved == "yesno":
        return _compare_yes_no(extraction, gold, resolved, options)
    if resolved == "math":
        return _compare_math(extraction, gold, options)
    return _compare_text(extraction, gold)


def grade(
    response: str,
    gold: Any,
    *,
    kind: AnswerKind = "auto",
    choices: Sequence[str] | None = None,
    rel_tol: float | None = None,
    abs_tol: float | None = None,
    iou_threshold: float = 0.5,
    judge: Judge | None = None,
    question: str = "",
) -> Grade:
    """Judge ``response`` against the ``gold`` answer (the stages are in this module's docstring).

    Args:
        response: the model's generated text.
        gold: the gold answer: a string or number; yes/no; a letter, index or option text
            when ``choices`` are given; four numbers ``x1, y1, x2, y2`` for a box; or a list
            of acceptable answers (any one matching counts).
        kind: ``"auto"`` infers it from the gold (:func:`infer_kind`); or one of number
            (integer or real by the gold's value), integer, real, math, choice, yesno, box, text.
        choices: the options of a multiple-choice question.
        rel_tol: relative tolerance for numbers. None: 1e-6 for real gold values, exact for
            integers. Giving either tolerance applies it to integers too.
        abs_tol: absolute tolerance for numbers (None: 1e-9 for reals, exact for integers).
        iou_threshold: a box is correct when its IoU with the gold box reaches this.
        judge: optional ``judge(response, gold, question=...) -> bool`` (an LLM grader, say),
            asked only when the rules say wrong; off by default.
        question: passed to the judge.

    Returns:
        A :class:`Grade`.

    Raises:
        GradingError: a gold answer that cannot be graded as the kind asked for.
    """
    options = _Options(rel_tol, abs_tol, iou_threshold)
    if isinstance(gold, (list, tuple)) and not is_box(gold):
        if not gold:
            raise GradingError("An empty list of acceptable answers cannot be graded.")
        grades = [_grade_one(response, g, kind, choices, options) for g in gold]
        best = next((g for g in grades if g.correct), grades[0])
        index = grades.index(best)
        result = replace(best, reason=f"{best.reason} [acceptable answer {index + 1} of {len(gold)}]")
    else:
        result = _grade_one(response, gold, kind, choices, options)
    if result.correct or judge is None:
        return result
    gold_text = " | ".join(map(str, gold)) if isinstance(gold, (list, tuple)) and not is_box(gold) else str(gold)
    verdict = bool(judge(response, gold_text, question=question))
    return replace(result, correct=verdict, method="judge", stage="judge",
                   reason=f"judge: said {'right' if verdict else 'wrong'} after the rules said wrong ({result.reason})")
