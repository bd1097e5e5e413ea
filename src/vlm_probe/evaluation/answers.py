"""Reading the final answer out of a model's response: the first stages of grading.

:func:`~vlm_probe.evaluation.grading.grade` is a pipeline of named stages; this module holds
the first three. Each is a plain function, usable and tested on its own.

1. **extract** (:func:`extract_answer`): the answer span and where it came from. The first
   that is present wins: the last ``<answer>...</answer>`` block, the last ``\\boxed{...}``,
   the last answer phrase ("the answer is X", "Answer: X", "the correct option is (D)",
   "I choose B", ...), else the whole response. Text inside ``<think>...</think>`` is left
   out when an answer follows it, and markdown emphasis (``**B**``) is dropped.
2. **normalise** (:func:`normalize_span`): markup around the answer is removed (``$...$``,
   ``\\(...\\)``, ``\\text{}``, ``\\$``, quotes, a final full stop) and LaTeX numbers become
   plain text (``\\frac{3}{4}`` -> ``3/4``, ``1.2\\times10^{6}`` -> ``1.2e6``).
3. **read** (one reader per answer type): :func:`read_number`, :func:`read_yes_no`,
   :func:`read_choice`, :func:`read_box`, :func:`expression_of` and :func:`text_candidates`
   (inequalities become intervals: :func:`inequality_to_interval`). A reader returns a
   :class:`Reading`: the value, the exact text it was read from, or why there is none
   (nothing of that type, a hedge such as "either 3 or 5", a negation).

Where a span holds several values of the type, one rule picks (:func:`_pick`): the value
that opens the span ("8 (3 red and 5 blue)" -> 8) unless a conclusion follows it ("3 red and
2 blue, so 5" -> 5); otherwise the last value outside parentheses. A value joined to a
different one by "or" is a hedge and reads as no answer. Everything here is regular
expressions; the comparison (stage 4) is in :mod:`vlm_probe.evaluation.grading`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Generic, Literal, NamedTuple, TypeVar

Source = Literal["answer_tag", "boxed", "answer_phrase", "full"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Box = tuple[float, float, float, float]
T = TypeVar("T")

# ----------------------------------------------------------------------------- stage 1: extract

_THINK_END = re.compile(r"</think\s*>", re.I)
_EMPHASIS = re.compile(r"\*\*|__|(?<![\w*])\*(?=\S)|(?<=\S)\*(?![\w*])|`")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OPEN_ANSWER_TAG = re.compile(r"<answer>(.*)$", re.S | re.I)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"[{}]")
#: The phrases that introduce a final answer; the last one in a response wins.
_PHRASE = re.compile(
    r"(?:\b(?:final\s+|correct\s+|right\s+|best\s+|short\s+)?answer(?:\s+to\s+(?:the|this)\s+question)?"
    r"\s*(?:\bis\b|\bwould\s+be\b|\bshould\s+be\b|\bmust\s+be\b|\bwill\s+be\b|:|=)"
    r"|\b(?:final|correct|right|best)\s+(?:option|choice)\s*(?:\bis\b|\bwould\s+be\b|\bshould\s+be\b|:)"
    r"|\bI\s*(?:would\s+|will\s+|'d\s+|'ll\s+|\u2019d\s+|\u2019ll\s+)?(?:choose|pick|select|go\s+with)\b"
    r"|\bfinal\s+answer[ \t]*(?=\n))",
    re.I,
)
_SENTENCE_END = re.compile(r"(?<!approx)(?<!\be\.g)(?<!\bi\.e)\.(?=\s|$)|\n")


@dataclass(frozen=True)
class Extraction:
    """Stage 1's output: the answer span of a response and where it came from (``source``)."""

    text: str
    source: Source

    @property
    def marked(self) -> bool:
        """Whether the response marked its answer (a tag, a box or an answer phrase)."""
        return self.source != "full"


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces handled; None if absent."""
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]  # the position of each box's "{"
    if not starts:
        return None
    closing: dict[int, int] = {}
    stack: list[int] = []
    for brace in _BRACE.finditer(text, starts[0]):  # one pass: linear even for many unclosed boxes
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            closing[stack.pop()] = brace.start()
    for start in reversed(starts):
        if start in closing:
            return text[start + 1 : closing[start]].strip()
    return None


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block; an unclosed last tag counts to the end."""
    blocks = _ANSWER_TAG.findall(text)
    if blocks:
        return blocks[-1].strip()
    opened = list(_OPEN_ANSWER_TAG.finditer(text))
    return opened[-1].group(1).strip() if opened else None


def answer_phrase(text: str) -> str | None:
    """The X of the last answer phrase ("the answer is X", "Answer: X", "I choose X", ...).

    X runs to the end of its sentence or line; when the phrase ends its line ("Answer:" and
    the answer below), the next non-empty line. "The answer is" with nothing after it gives
    ``""`` (a response cut off before its answer), no phrase at all gives None.
    """
    matches = list(_PHRASE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].lstrip(" \t:")
    rest = rest.lstrip("\n \t:") if rest.startswith("\n") else rest
    end = _SENTENCE_END.search(rest)
    return (rest[: end.start()] if end else rest).strip()


def strip_think(text: str) -> str:
    """The text after the last ``</think>``, when there is any; else ``text`` unchanged."""
    parts = _THINK_END.split(text)
    return parts[-1] if len(parts) > 1 and parts[-1].strip() else text


def extract_answer(response: str) -> Extraction:
    """Stage 1: the answer span of ``response`` by the precedence in this module's docstring."""
    text = _EMPHASIS.sub("", strip_think(response))
    tagged = answer_tag(text)
    if tagged is not None:
        return Extraction(_inner(tagged), "answer_tag")
    boxed = last_boxed(text)
    if boxed is not None:
        return Extraction(boxed, "boxed")
    stated = answer_phrase(text)
    if stated is not None:
        inner = last_boxed(stated)
        return Extraction(inner if inner is not None else stated, "answer_phrase")
    return Extraction(text.strip(), "full")


def _inner(span: str) -> str:
    """A tag's content, narrowed to a box or an answer phrase inside it."""
    boxed = last_boxed(span)
    if boxed is not None:
        return boxed
    stated = answer_phrase(span)
    return stated if stated else span


# ----------------------------------------------------------------------------- stage 2: normalise

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|operatorname|mbox)\s*\{([^{}]*)\}")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+(?:\.\d+)?)\s*\}\s*\{\s*(\d+(?:\.\d+)?)\s*\}")
_LATEX_SCI = re.compile(r"(?<=\d)\s*(?:\\times|\\cdot|\u00d7|\u00b7|\*|x)\s*10\s*\^\s*\{?\s*([-+]?\d+)\s*\}?")
_DELIMITED = re.compile(r"^\$+([^$]*)\$+$|^\\\((.*)\\\)$|^\\\[(.*)\\\]$", re.S)
_MARKUP = re.compile(r"[\\$*_`'\"{\u2018\u2019\u201c\u201d\u2212]|\d\s*[x\u00d7\u00b7]\s*10")
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\quad|\\qquad|\\left|\\right")


def normalize_span(span: str) -> str:
    """Stage 2: ``span`` without the markup around its answer.

    Removes markdown emphasis, math delimiters (``$...$``, ``\\(...\\)``, ``\\[...\\]``),
    ``\\text{}``-style wrappers, LaTeX spacing, escaped dollar signs (``\\$12`` -> ``12``),
    surrounding quotes and a final full stop; rewrites a numeric ``\\frac{3}{4}`` as ``3/4``,
    ``\\%`` as ``%`` and ``a \\times 10^{n}`` as ``aen``. Idempotent.
    """
    if not _MARKUP.search(span):  # the common case: plain text, nothing to remove
        return span.strip().rstrip(". \t\n")
    s = _EMPHASIS.sub("", span).strip()
    s = s.replace("\\$", "").replace("\\%", "%").replace("{,}", ",").replace("\u2212", "-")
    s = _LATEX_SPACING.sub(" ", s)
    for _ in range(3):  # nested wrappers: \boxed{\text{\textbf{B}}}
        s = _TEXT_MACRO.sub(r"\1", s)
    s = _LATEX_FRAC.sub(r"\1/\2", s)
    s = _LATEX_SCI.sub(r"e\1", s)
    s = s.strip()
    for _ in range(2):
        match = _DELIMITED.match(s)
        if match:
            s = next(g for g in match.groups() if g is not None).strip()
    if s.count("$") == 1:
        s = re.sub(r"^\$(?=\s*[-+]?\d)", "", s)  # a currency sign before a number
    s = s.strip().strip("\"'\u201c\u201d\u2018\u2019").strip()
    return s.rstrip(". \t\n")


# ----------------------------------------------------------------------------- readers (shared)


class Candidate(NamedTuple, Generic[T]):
    """A value found in a span: where it is and the exact text it was read from."""

    start: int
    end: int
    value: T
    text: str


@dataclass(frozen=True)
class Reading(Generic[T]):
    """Stage 3's output: the value read from a span (None if none) and how it was read.

    Attributes:
        value: the value, or None.
        text: the exact text the value was read from ("" if none).
        how: ``whole`` (the span is the value), ``head`` (the value opens the span), ``last``
            (the last of several), ``only``; or why there is no value: ``none``, ``hedge``,
            ``negated``, ``invalid``.
        note: a human-readable detail (the hedged values, ...).
        at: where in the (normalised) span the value starts, when it was picked from several.
    """

    value: T | None
    text: str = ""
    how: str = "none"
    note: str = ""
    at: int | None = None

    @property
    def found(self) -> bool:
        return self.value is not None


_LEAD = re.compile(
    r"(?:\s|[:>#\-\u2013\u2014=~\u2248]|(?:approximately|approx\.?|about|around|roughly|nearly|almost|exactly|"
    r"precisely|just|only|definitely|certainly|clearly|probably|simply|option|choice|letter|a\s+total\s+of)\b)*",
    re.I,
)
_OPERATOR_AFTER = re.compile(
    r"\s*(?:[-+*/^\u00d7\u00f7=<>\\]|\b(?:plus|minus|times|divided|multiplied|over|equals)\b)", re.I
)
_CONCLUSION = re.compile(r"\b(?:so|thus|therefore|hence|in\s+total|altogether|making|giving|which\s+(?:makes|gives))\b",
                         re.I)
_HEDGE = re.compile(r"^\s*,?\s*(?:or|and|and/or|or\s+maybe|or\s+possibly|or\s+perhaps|or\s+even|to|\u2013)\s*$|^[-,]$",
                    re.I)
#: A short gap holding "or" ("x = 2 or x = 3", "A (or possibly C)") also makes a hedge.
_SHORT_OR = re.compile(r"^[^.;!?\n]{0,12}\bor\b[^.;!?\n]{0,12}$", re.I)
_OPERAND_BEFORE = re.compile(r"\S\s*(?:[-+*/\u00d7\u00f7^]|\b(?:plus|minus|times|(?:divided|multiplied)\s+by|over))\s*$",
                             re.I)
_RANGE_GAP = re.compile(r"^\s*(?:and|-)\s*$", re.I)
_BETWEEN = re.compile(r"\b(?:between|from)\s*$", re.I)
_BECAUSE = re.compile(r"\b(?:because|since|as)\b|:(?=\s)", re.I)
_NOT_BEFORE = re.compile(r"\b(?:not|n't|never|isn't|aren't)\s*$", re.I)
_NOT_AFTER = re.compile(r"\s*(?:(?:is|are)\s+(?:not|wrong|incorrect)\b|isn't\b|aren't\b)", re.I)
_OPEN_ENDED = re.compile(r"\s*(?:or|and)\s+(?:more|fewer|less|so|above|below)\b", re.I)
_LIST_MARKER = re.compile(r"(?m)^[ \t]*\d{1,2}[.)][ \t]+")


def _paren_depths(text: str) -> list[int]:
    depth, out = 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        out.append(depth)
        if ch == ")" and depth:
            depth -= 1
    return out


def _pick(text: str, found: Sequence[Candidate[T]], what: str, *, same: Any = None) -> Reading[T]:
    """The candidate that answers, by the rule in this module's docstring.

    ``same(a, b)`` says whether two candidates agree (default: equal values); agreeing
    candidates are never a hedge.
    """
    same = same or (lambda a, b: a.value == b.value)
    if not found:
        return Reading(None, how="none", note=f"no {what} in the answer")
    lead = _LEAD.match(text)
    lead_end = lead.end() if lead else 0
    first = found[0]
    chosen, how = None, "last"
    if len(found) == 1:
        chosen, how = first, "only"
    elif first.start <= lead_end and not _OPERATOR_AFTER.match(text, first.end):
        later = _CONCLUSION.search(text, first.end)
        if later is None or not any(c.start >= later.end() for c in found):
            chosen, how = first, "head"
    if chosen is None:
        depths = _paren_depths(text)
        outside = [c for c in found if depths[c.start] == 0] or list(found)
        reason = _BECAUSE.search(text, outside[0].end)  # "6 because 2x = 12", "5 objects: 2 cubes and 3 ..."
        if reason is not None and not _CONCLUSION.search(text, reason.end()):
            outside = [c for c in outside if c.start < reason.start()]
        chosen = outside[-1]
    i = found.index(chosen)
    for j in (i - 1, i + 1):
        if 0 <= j < len(found) and not same(found[j], chosen):
            a, b = sorted((found[j], chosen))
            gap = text[a.end : b.start]
            ranged = _RANGE_GAP.match(gap) and _BETWEEN.search(text[: a.start])
            if _HEDGE.match(gap) or _SHORT_OR.match(gap) or ranged:
                return Reading(None, text[a.start : b.end], "hedge", f"a hedge between {a.text!r} and {b.text!r}")
    if _NOT_BEFORE.search(text[: chosen.start]) or _NOT_AFTER.match(text, chosen.end):
        return Reading(None, chosen.text, "negated", f"{chosen.text!r} is negated")
    if _OPEN_ENDED.match(text, chosen.end):
        return Reading(None, text[chosen.start :], "hedge", f"{chosen.text!r} is a bound, not a value")
    return Reading(chosen.value, chosen.text, how, at=chosen.start)


# ----------------------------------------------------------------------------- numbers

#: A number written with digits: sign, thousands commas, decimals, scientific notation, a
#: fraction, a percent sign, or a few glued units. Look-arounds keep ``1.5`` from matching
#: ``5``, ``x2`` from matching ``2`` and ``10^6`` from matching ``10``.
_NUMBER = re.compile(
    r"(?:(?<![\w)\].}{^_\\])(?<![\d)\]}] )(?P<sign>[-+\u2212])|(?<![\w.{^_\\]))"
    r"(?P<mant>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:[eE](?P<exp>[-+\u2212]?\d+))?"
    r"(?:\s*/\s*(?P<den>\d+(?:\.\d+)?)(?![\w.]))?"
    r"(?P<pct>\s*%|\s*percent\b)?"
    r"(?:(?P<unit>cm|mm|km|kg|mg|ml|lbs?|ft|in|m|g|s|h|hrs?|min|px|\u00b0[CF]?|deg)(?![\w]))?"
    r"(?![\w^\\{(]|\.\d|,\d{3}\b|\s*\^)"
)
#: Number words: value and role ("unit", "teen", "ten", "hundred", "scale"; "none" is zero).
_UNITS: dict[str, tuple[int, str]] = {
    **{w: (v, "unit") for v, w in enumerate("zero one two three four five six seven eight nine".split())},
    **{w: (v + 10, "teen") for v, w in enumerate(
        "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())},
    **{w: (v, "ten") for v, w in zip(range(20, 100, 10),
                                      "twenty thirty forty fifty sixty seventy eighty ninety".split())},
    "hundred": (100, "hundred"),
    **{w: (v, "scale") for v, w in ((10**3, "thousand"), (10**6, "million"), (10**9, "billion"), (10**12, "trillion"))},
    "none": (0, "none"),
}
_WORD = "|".join(sorted(_UNITS, key=len, reverse=True))
_NUMBER_WORDS = re.compile(
    rf"\b(?:{_WORD})(?:(?:[\s-]+|,\s*|\s+and\s+)(?:{_WORD}))*\b(?!-)", re.I
)
_WORD_TOKEN = re.compile(rf"\b(?:{_WORD}|and)\b|,", re.I)
_PRONOUN_ONE = re.compile(r"\b(?:the|this|that|which|each|every|any|another|no|a|one)\s+(?:[a-z]+\s+)?$", re.I)
_NO_AS_ZERO = re.compile(r"\b(?:are|is|has|have|see|contains?|shows?|with)\s+(no)\b(?=\s+[a-z])"
                         r"|((?:\bnot|n't|n\u2019t)\s+(?:any|a\s+single)\b)", re.I)


def _fraction(match: re.Match[str]) -> Fraction | None:
    mant = match.group("mant").replace(",", "")
    value = Fraction(mant)
    if match.group("exp"):
        value *= Fraction(10) ** int(match.group("exp").replace("\u2212", "-"))
    if match.group("den"):
        den = Fraction(match.group("den"))
        if den == 0:
            return None
        value /= den
    return -value if match.group("sign") in ("-", "\u2212") else value


def number_words(text: str) -> list[Candidate[Fraction]]:
    """Numbers written in words ("twenty-one", "one hundred and five", "two million and one")."""
    out: list[Candidate[Fraction]] = []
    for match in _NUMBER_WORDS.finditer(text):
        out += _split_words(match)
    return out


def _split_words(match: re.Match[str]) -> list[Candidate[Fraction]]:
    """One run of number words as one or more numbers ("three four" is 3 and 4, not 7)."""
    out: list[Candidate[Fraction]] = []
    total = current = 0
    last: str | None = None
    start = end = None
    pending_sep = ""
    scales: list[int] = []

    def flush() -> None:
        nonlocal total, current, last, start, scales
        if start is not None and last not in (None, "and"):
            text = match.string[start:end]
            out.append(Candidate(start, end, Fraction(total + current), text))
        total = current = 0
        last, start, scales = None, None, []

    for token in _WORD_TOKEN.finditer(match.string, match.start(), match.end()):
        word = token.group().lower()
        if word in ("and", ","):
            pending_sep = word
            continue
        value, kind = _UNITS[word]
        after_sep = pending_sep
        pending_sep = ""
        allowed = {
            "unit": last in (None, "ten", "hundred", "scale"),
            "teen": last in (None, "hundred", "scale"),
            "ten": last in (None, "hundred", "scale"),
            "hundred": last in ("unit", "teen", "ten") and current < 100,
            "scale": last in ("unit", "teen", "ten", "hundred") and (not scales or value < scales[-1]),
            "none": last is None,
        }[kind]
        if after_sep == "," and last != "scale":
            allowed = False  # "one, two" is a list; "one thousand, two hundred" is one number
        if after_sep == "and" and last not in ("hundred", "scale"):
            allowed = False  # "three and four" are two numbers
        if not allowed:
            flush()
        if start is None:
            start = token.start()
        if kind in ("unit", "teen", "ten", "none"):
            current += value
        elif kind == "hundred":
            current *= 100
        else:
            total += current * value
            current = 0
            scales.append(value)
        last, end = kind, token.end()
        if kind == "none":
            flush()
    flush()
    return out


def number_candidates(text: str) -> list[Candidate[Fraction]]:
    """Every number in ``text`` in order: digits, number words, "none" / "no <noun>" as 0.

    List markers ("1. ", "2. ") of a numbered list and the pronoun "one" ("the red one")
    are left out.
    """
    found: list[Candidate[Fraction]] = []
    markers = [m.span() for m in _LIST_MARKER.finditer(text)]
    skip = {m[0] for m in markers} if len(markers) >= 2 else set()
    for match in _NUMBER.finditer(text):
        value = _fraction(match)
        if value is None:
            continue
        line_start = text.rfind("\n", 0, match.start()) + 1
        if skip and any(line_start <= s <= match.start() and not text[s : match.start()].strip() for s in skip):
            continue
        found.append(Candidate(match.start(), match.end(), value, match.group().strip()))
    for cand in number_words(text):
        if cand.text.lower() == "one" and _PRONOUN_ONE.search(text[: cand.start]):
            continue
        found.append(cand)
    for match in _NO_AS_ZERO.finditer(text):  # "there are no cubes", "there isn't any cube"
        group = 1 if match.group(1) else 2
        found.append(Candidate(match.start(group), match.end(group), Fraction(0), match.group(group)))
    found.sort(key=lambda c: c.start)
    return found


def find_numbers(text: str) -> list[float]:
    """Every number written with digits in ``text``, in order (``1,234`` -> 1234.0, ``3/4`` -> 0.75)."""
    return [float(v) for m in _NUMBER.finditer(text) if (v := _fraction(m)) is not None]


_WHOLE_NUMBER_PREFIX = re.compile(r"^(?:[a-zA-Z]\s*=|=|\u2248|~|approximately|about|around|roughly)\s*", re.I)
#: Words after a number that leave it the whole answer ("12 apples"), unless they negate or hedge it.
_TRAILING_WORDS = re.compile(r"^(?!.*\b(?:not|no|never|wrong|incorrect|or)\b)(?:\s+[A-Za-z][A-Za-z\s]*|\s*%)?$", re.I)


def parse_number(span: str) -> Fraction | None:
    """``span`` as a number if it is one number and nothing else of substance; else None.

    Accepts ``"12"``, ``"-3.5"``, ``"1,234"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"50%"`` (50),
    ``"1.2e6"``, ``"1.2 \\times 10^{6}"``, ``"x = 7"``, ``"$12$"``, ``"\\$12"``, ``"12 apples"``
    and number words (``"twenty-one"``, ``"one hundred and five"``). Returns None for
    ``"3\\sqrt{2}"``, ``"2\\pi"``, ``"10^6"``, ``"1.5 or 5"``. The value is exact (a Fraction).
    """
    s = _WHOLE_NUMBER_PREFIX.sub("", normalize_span(span))
    if not s:
        return None
    match = _NUMBER.match(s)
    if match and _TRAILING_WORDS.match(s[match.end() :]) and not number_words(s[match.end() :]):
        return _fraction(match)
    words = number_words(s)
    if len(words) == 1 and words[0].start == 0 and _TRAILING_WORDS.match(s[words[0].end :]):
        return words[0].value
    return None


def read_number(span: str) -> Reading[Fraction]:
    """Stage 3 for numbers: the number ``span`` answers with (exact), by the picking rule."""
    s = normalize_span(span)
    whole = parse_number(s)
    if whole is not None:
        return Reading(whole, s, "whole")
    found = number_candidates(s)
    reading = _pick(s, found, "number", same=_same_number)
    if reading.found and reading.how != "head" and reading.at is not None:
        if _OPERAND_BEFORE.search(s[: reading.at]):  # "2 + 3": an operand, not a result
            return Reading(None, s, "none", f"{reading.text!r} is an operand of an expression, not its value")
    return reading


def _same_number(a: Candidate[Fraction], b: Candidate[Fraction]) -> bool:
    """Equal values, or one value written as a percent of the other ("0.75, or 75%")."""
    if a.value == b.value:
        return True
    return (a.text.endswith("%") and a.value / 100 == b.value) or (b.text.endswith("%") and b.value / 100 == a.value)


def last_number(text: str) -> float | None:
    """The last number in ``text`` (digits or words), or None."""
    found = number_candidates(text)
    return float(found[-1].value) if found else None


def format_exact(value: Fraction) -> str:
    """A number as exact text: ``21``, ``1.5``, ``0.000001``, ``1/3`` (never rounded)."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


# ----------------------------------------------------------------------------- yes / no

YES_WORDS = frozenset({"yes", "yeah", "yep", "yup", "true"})
NO_WORDS = frozenset({"no", "nope", "false"})
_YES_NO = re.compile(r"(?<![\w'])(yes|yeah|yep|yup|true|no|nope|false)(?![\w'])", re.I)
_YES_NO_END = re.compile(r"\s*(?:[.,!;:)]|$)")


def parse_yes_no(text: Any) -> bool | None:
    """A gold yes/no answer (``"Yes"``, ``"no."``, ``True``) as a bool, or None."""
    if isinstance(text, bool):
        return text
    if not isinstance(text, str):
        return None
    word = _norm_words(text)
    return True if word in YES_WORDS else False if word in NO_WORDS else None


def read_yes_no(span: str) -> Reading[bool]:
    """Stage 3 for yes/no: "Yes, there is a dog." -> yes; "There is no dog." -> none.

    A yes/no word counts where it opens the span or ends a clause ("..., so yes.");
    "no" before a noun ("no dog") is not an answer.
    """
    s = normalize_span(span)
    found = []
    lead = _LEAD.match(s)
    for match in _YES_NO.finditer(s):
        opens = match.start() <= (lead.end() if lead else 0)
        if opens or _YES_NO_END.match(s, match.end()):
            word = match.group(1).lower()
            found.append(Candidate(match.start(), match.end(), word in YES_WORDS, match.group(1)))
    return _pick(s, found, "yes or no")


# ----------------------------------------------------------------------------- choices

_NOT_LETTER_AFTER = re.compile(r"\s+(?!(?:is|because|since|as|would|should|seems|appears|matches|fits|and|or)\b)"
                               r"[a-z]")
_LETTER = re.compile(r"(?<![\w'\u2019\-\\])(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z]))(?![\w'\u2019\-])")
_OPTION_PREFIX = re.compile(r"^(?:the\s+)?(?:option|choice|letter|answer)\s*:?\s*", re.I)


def choice_letter(index: int) -> str:
    """The letter of option ``index`` (0 -> ``A``)."""
    return LETTERS[index]


def _norm_words(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _letters(span: str, n: int) -> tuple[list[Candidate[int]], str]:
    """Option letters in ``span``: bracketed anywhere, bare capitals where not an article or
    pronoun ("A red circle", "I think"), lower case only where they open the span."""
    found: list[Candidate[int]] = []
    invalid = ""
    lead = _LEAD.match(span)
    lead_end = lead.end() if lead else 0
    for match in _LETTER.finditer(span):
        bracketed = match.group(1) or match.group(2)
        letter = bracketed or match.group(3)
        opens = match.start() <= lead_end
        if not bracketed:
            after = span[match.end() :]
            if letter.islower():
                whole = opens and re.match(r"^\s*(?:[.):]|$)", after)
                if not whole:
                    continue
            elif letter in "AI" and (_NOT_LETTER_AFTER.match(after) or after.startswith(("'", "\u2019"))):
                continue
            elif not opens and not re.match(r"^\s*(?:[.,;:!?)]|$|\s+[a-z])", after):
                continue
        index = LETTERS.find(letter.upper())
        if index >= n:
            invalid = invalid or letter.upper()
            continue
        found.append(Candidate(match.start(), match.end(), index, match.group()))
    return found, invalid


def read_choice(span: str, choices: Sequence[str]) -> Reading[int]:
    """Stage 3 for multiple choice: the index of the chosen option, from its letter (``B``,
    ``(b)``, ``b)``, ``Option B``, ``\\text{B}``) or its text.

    Order: the span equals an option's text; an option letter (picking rule); the option
    whose text opens the span; the one option whose text the span contains (the longest,
    if it covers the others).
    """
    s = _OPTION_PREFIX.sub("", normalize_span(span))
    norm_choices = [_norm_words(c) for c in choices]
    normed = _norm_words(s)
    if normed and norm_choices.count(normed) == 1:
        return Reading(norm_choices.index(normed), s, "whole")
    letters, invalid = _letters(s, len(choices))
    if letters:
        named = {c.value for c in letters}
        if len(named) == len(choices) >= 3 and not _CONCLUSION.search(s):
            return Reading(None, s, "hedge", "the answer names every option (the options echoed?)")
        return _pick(s, letters, "option letter")
    if invalid and not _LETTER.sub("", s).strip(" .:()"):
        return Reading(None, invalid, "invalid", f"letter {invalid} is not one of the {len(choices)} options")
    head = _norm_words(_clause_head(s))
    if head and norm_choices.count(head) == 1:
        return Reading(norm_choices.index(head), _clause_head(s), "head")
    contained = [i for i, c in enumerate(norm_choices) if c and re.search(rf"\b{re.escape(c)}\b", normed)]
    if len(contained) > 1:  # "red square" contains "square": the longest wins if it covers the others
        longest = max(contained, key=lambda i: len(norm_choices[i]))
        if all(norm_choices[i] in norm_choices[longest] for i in contained):
            contained = [longest]
    if len(contained) == 1:
        if re.search(r"\bor\b", normed) and normed != norm_choices[contained[0]]:
            return Reading(None, s, "hedge", "the answer names an option with 'or'")
        return Reading(contained[0], choices[contained[0]], "only")
    if len(contained) > 1:
        return Reading(None, s, "hedge", f"the answer names {len(contained)} options")
    return Reading(None, how="none", note="no option letter or option text in the answer")


def extract_choice(response: str, choices: Sequence[str]) -> int | None:
    """The chosen option's index in a whole response (stages 1-3), or None."""
    return read_choice(extract_answer(response).text, choices).value


# ----------------------------------------------------------------------------- free text

_CLAUSE_CUT = re.compile(r"\s*(?:[,;:(\[]|\s-\s|\s\u2013\s|\s\u2014\s|\b(?:because|since|as|which|so|but|while)\b)",
                         re.I)
_COPULA = re.compile(r"(?:\b(?:is|are|was|were|looks|appears\s+to\s+be|seems\s+to\s+be)\b|['\u2019]s\b)\s+", re.I)


def _clause_head(text: str) -> str:
    cut = _CLAUSE_CUT.search(text)
    return text[: cut.start()] if cut and cut.start() > 0 else text


def text_candidates(span: str, *, marked: bool) -> list[str]:
    """Stage 3 for free text: the phrases that may state the answer, most literal first.

    The whole span; its first clause ("red, because ..." -> "red"); and what its last
    sentence (the whole span, if ``marked``) says something is ("The square is red." -> "red").
    """
    s = normalize_span(span)
    out = [s, _clause_head(s)]
    sentences = [p for p in re.split(r"(?<=[.!?])\s+|\n+", s) if p.strip()] if not marked else [s]
    last = sentences[-1] if sentences else s
    copulas = list(_COPULA.finditer(last))
    if copulas:
        out.append(_clause_head(last[copulas[-1].end() :]).rstrip(".!? "))
    return list(dict.fromkeys(p for p in out if p.strip()))


# ----------------------------------------------------------------------------- boxes

_N = r"(-?\d+(?:\.\d+)?)"
_PAIR = rf"[\[(]\s*{_N}\s*,\s*{_N}\s*[\])]"
_CORNER_PAIRS = re.compile(rf"{_PAIR}[^\d\[(]{{0,40}}?{_PAIR}")
_BRACKETED_BOX = re.compile(rf"[\[(]\s*{_N}\s*,\s*{_N}\s*,\s*{_N}\s*,\s*{_N}\s*[\])]")
_PLAIN_BOX = re.compile(rf"(?<![\d.]){_N}\s*,\s*{_N}\s*,\s*{_N}\s*,\s*{_N}(?!\d|\.\d)")
_NAMED = re.compile(r"[\"']?\b(x_?1|y_?1|x_?2|y_?2|x_?min|y_?min|x_?max|y_?max|left|top|right|bottom|x|y|width|w|"
                    r"height|h)\b[\"']?\s*[:=]\s*" + _N, re.I)
_NAMED_SETS = (
    (("x1", "y1", "x2", "y2"), False),
    (("xmin", "ymin", "xmax", "ymax"), False),
    (("left", "top", "right", "bottom"), False),
    (("x", "y", "width", "height"), True),
    (("x", "y", "w", "h"), True),
)


def _named_boxes(text: str) -> list[Candidate[Box]]:
    values: dict[str, tuple[float, int, int]] = {}
    for match in _NAMED.finditer(text):
        key = match.group(1).lower().replace("_", "")
        values.setdefault(key, (float(match.group(2)), match.start(), match.end()))
    for keys, sized in _NAMED_SETS:
        if all(k in values for k in keys):
            a, b, c, d = (values[k][0] for k in keys)
            box = (a, b, a + c, b + d) if sized else (a, b, c, d)
            start = min(values[k][1] for k in keys)
            end = max(values[k][2] for k in keys)
            return [Candidate(start, end, box, text[start:end])]
    return []


def _boxes(text: str) -> list[Candidate[Box]]:
    named = _named_boxes(text)
    if named:
        return named
    for pattern in (_CORNER_PAIRS, _BRACKETED_BOX, _PLAIN_BOX):
        found = [Candidate(m.start(), m.end(), tuple(float(v) for v in m.groups()), m.group())
                 for m in pattern.finditer(text)]
        if found:
            return found  # type: ignore[return-value]
    return []


def read_box(span: str, response: str | None = None) -> Reading[Box]:
    """Stage 3 for boxes: ``x1, y1, x2, y2`` from ``[x1, y1, x2, y2]``, two corner pairs
    ``(x1, y1), (x2, y2)``, named coordinates (``x1=``, ``xmin:``, ``left/top/right/bottom``,
    ``x, y, width, height``) or four plain numbers. Falls back to ``response`` when the span
    has no box. Several different boxes read as no answer (ambiguous).
    """
    for text in (span, strip_think(response)) if response is not None else (span,):
        found = _boxes(text)
        if found:
            distinct = list(dict.fromkeys(c.value for c in found))
            if len(distinct) > 1:
                return Reading(None, found[0].text, "hedge", f"{len(distinct)} different boxes")
            return Reading(found[-1].value, found[-1].text, "only")
    return Reading(None, how="none", note="no box (x1, y1, x2, y2) in the answer")


def parse_box(text: str) -> Box | None:
    """The box a whole response answers with (stages 1-3), or None."""
    return read_box(extract_answer(text).text, text).value

# ----------------------------------------------------------------------------- math expressions

_ENGLISH_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_MATH_NAMES = frozenset({"sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "pi", "infty", "inf",
                         "frac", "dfrac", "tfrac", "cdot", "times", "le", "leq", "ge", "geq", "lt", "gt", "circ",
                         "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh", "max", "min", "mod"})
_DELIMITED_SEGMENT = re.compile(r"\$\$?([^$]+?)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.S)
_INEQUALITY = re.compile(r"(<=|>=|\\leq?\b|\\geq?\b|\\lt\b|\\gt\b|\u2264|\u2265|<|>)")
_LESS = {"<": False, "\\lt": False, "<=": True, "\\le": True, "\\leq": True, "\u2264": True}
_GREATER = {">": False, "\\gt": False, ">=": True, "\\ge": True, "\\geq": True, "\u2265": True}


def _words(text: str) -> list[re.Match[str]]:
    """English words in ``text`` (not LaTeX commands or function names)."""
    return [m for m in _ENGLISH_WORD.finditer(text) if m.group().lower() not in _MATH_NAMES]


#: Longer "expressions" are runaway generations, not answers, and are never sent to math-verify.
MAX_EXPRESSION_CHARS = 300


def expression_of(span: str, *, marked: bool) -> Reading[str]:
    """The math expression a span answers with (stage 3 for ``math``).

    The last ``$...$`` (or ``\\(...\\)``) segment if there is one; else the span if it has no
    words; else the expression that opens a marked span, or the last one between words.
    Two expressions joined by "or" are a hedge; one longer than :data:`MAX_EXPRESSION_CHARS`
    is no answer.
    """
    reading = _expression_of(span, marked=marked)
    if reading.value is not None and len(reading.value) > MAX_EXPRESSION_CHARS:
        return Reading(None, how="none", note=f"an expression of {len(reading.value)} characters is not an answer")
    return reading


def _expression_of(span: str, *, marked: bool) -> Reading[str]:
    segments = [next(g for g in m.groups() if g is not None) for m in _DELIMITED_SEGMENT.finditer(span)]
    if segments:
        return Reading(segments[-1].strip(), segments[-1].strip(), "only")
    s = normalize_span(span)
    words = _words(s)
    if not words:
        return Reading(s, s, "whole") if s else Reading(None, note="an empty answer")
    pieces, start = [], 0
    for word in [*words, None]:
        end = word.start() if word is not None else len(s)
        piece = s[start:end].strip(" \t\n.,;:")
        if piece and (re.search(r"[\d\\]", piece) or re.fullmatch(r"[A-Za-z]", piece)):
            pieces.append((start, piece, word.group().lower() if word is not None else ""))
        start = word.end() if word is not None else len(s)
    if not pieces:
        return Reading(None, note="no expression in the answer")
    if any(after == "or" for _, _, after in pieces[:-1]):
        return Reading(None, s, "hedge", "expressions joined by 'or'")
    first_start, first, _ = pieces[0]
    if marked and not s[:first_start].strip():
        return Reading(first, first, "head")
    return Reading(pieces[-1][1], pieces[-1][1], "last")


def right_hand_side(expr: str) -> str:
    """The right-hand side of the last ``=`` (``x = 3\\sqrt{2}`` -> ``3\\sqrt{2}``)."""
    parts = re.split(r"(?<![<>!\\])=(?!=)", expr)
    return parts[-1].strip() if len(parts) > 1 and parts[-1].strip() else expr.strip()


def inequality_to_interval(expr: str) -> str:
    """``2 < x \\le 5`` -> ``(2, 5]``, ``x > 2`` -> ``(2, \\infty)``; anything else unchanged."""
    parts = [p.strip() for p in _INEQUALITY.split(expr)]
    if len(parts) not in (3, 5):
        return expr
    terms, ops = parts[0::2], parts[1::2]
    if all(op in _GREATER for op in ops):
        terms, ops = terms[::-1], [{">": "<", "\\gt": "<", "\u2265": "<="}.get(op, "<=") for op in ops[::-1]]
    if not all(op in _LESS for op in ops):
        return expr
    closed = [_LESS[op] for op in ops]
    if len(terms) == 3 and re.fullmatch(r"[A-Za-z]", terms[1]):
        lo, hi, lo_closed, hi_closed = terms[0], terms[2], closed[0], closed[1]
    elif len(terms) == 2 and re.fullmatch(r"[A-Za-z]", terms[0]):
        lo, hi, lo_closed, hi_closed = "-\\infty", terms[1], False, closed[0]
    elif len(terms) == 2 and re.fullmatch(r"[A-Za-z]", terms[1]):
        lo, hi, lo_closed, hi_closed = terms[0], "\\infty", closed[0], False
    else:
        return expr
    return f"{'[' if lo_closed else '('}{lo}, {hi}{']' if hi_closed else ')'}"
