"""Pulling the final answer out of a model's response.

Order of precedence (the first that is present wins):

1. the last ``<answer>...</answer>`` block (a ``\\boxed{}`` inside it is unwrapped),
2. the last ``\\boxed{...}`` (nested braces handled),
3. the last "the (final) answer is X" / "Answer: X",
4. the whole response.

Numbers, multiple-choice letters and boxes are then read from the extracted span by
:func:`parse_number`, :func:`extract_choice` and :func:`parse_box`. Numbers are matched
whole (``1.5`` is never read as ``5``, ``0.25`` never as ``25``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

Source = Literal["answer_tag", "boxed", "answer_is", "full"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_OPEN_ANSWER_TAG = re.compile(r"<answer>(.*)$", re.S | re.I)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(
    r"(?:the\s+)?(?:final\s+|correct\s+)?answer\s*(?:is\s*:?|:|=)\s*(?P<rest>[^\n]+)", re.I
)
_SENTENCE_END = re.compile(r"\.(?=\s|$)")
#: A whole number: optional sign, digits with optional thousands commas, optional decimals.
#: Look-arounds keep ``1.5`` from matching ``5`` and ``x2`` from matching ``2``.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<num>[-+\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+\u2212]?\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?![\w.]))?(?P<pct>\s*%)?(?![\w]|\.\d)"
)
NUMBER_WORDS: dict[str, int] = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORD = re.compile(r"\b(" + "|".join(NUMBER_WORDS) + r")\b", re.I)
_LATEX_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(\d+)\}$")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class Extraction:
    """The answer span of a response and where it came from (``source``)."""

    text: str
    source: Source


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces; None if absent or unclosed."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[match.end() : i - 1].strip()
    return None


def answer_tag(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` block; an unclosed last tag counts to the end."""
    blocks = _ANSWER_TAG.findall(text)
    if blocks:
        return blocks[-1].strip()
    opened = list(_OPEN_ANSWER_TAG.finditer(text))
    return opened[-1].group(1).strip() if opened else None


def answer_is(text: str) -> str | None:
    """The X of the last "the answer is X" / "Answer: X" (to the end of its sentence or line)."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = matches[-1].group("rest")
    end = _SENTENCE_END.search(rest)
    rest = rest[: end.start()] if end else rest
    return rest.strip().strip("*").strip() or None


def _strip(span: str) -> str:
    span = span.strip()
    if span.startswith("$") and span.endswith("$") and len(span) > 1:
        span = span.strip("$").strip()
    return re.sub(r"[.\s]+$", "", span)


def extract_answer(text: str) -> Extraction:
    """The answer span of ``text`` by the precedence in this module's docstring."""
    tagged = answer_tag(text)
    if tagged is not None:
        inner = last_boxed(tagged)
        return Extraction(_strip(inner if inner is not None else tagged), "answer_tag")
    boxed = last_boxed(text)
    if boxed is not None:
        return Extraction(_strip(boxed), "boxed")
    stated = answer_is(text)
    if stated is not None:
        inner = last_boxed(stated)
        return Extraction(_strip(inner if inner is not None else stated), "answer_is")
    return Extraction(_strip(text), "full")


# ----------------------------------------------------------------------------- numbers


def _to_float(match: re.Match[str]) -> float:
    num = match.group("num").replace(",", "").replace("\u2212", "-")
    value = float(num)
    if match.group("den"):
        den = int(match.group("den"))
        value = float(Fraction(num) / den) if den else float("nan")
    return value


def find_numbers(text: str) -> list[float]:
    """Every whole number in ``text`` in order (``1,234`` -> 1234.0, ``3/4`` -> 0.75; percent signs dropped)."""
    return [_to_float(m) for m in _NUMBER.finditer(text)]


def parse_number(span: str) -> float | None:
    """``span`` as a number if it is one number (and nothing else of substance); else None.

    Accepts ``"12"``, ``"-3.5"``, ``"1,234"``, ``"3/4"``, ``"\\frac{3}{4}"``, ``"50%"`` (50),
    ``"x = 7"``, ``"$12$"``, ``"12 apples"`` (one number, trailing words) and the number words
    zero to twenty. Returns None for ``"3\\sqrt{2}"``, ``"2\\pi"``, ``"1.5 or 5"``.
    """
    s = _strip(span).replace("\\!", "").replace("\\,", "").replace("{,}", ",")
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    s = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", s).strip()
    frac = _LATEX_FRAC.match(s)
    if frac:
        den = int(frac.group(2))
        return float(Fraction(int(frac.group(1)), den)) if den else None
    if s.lower() in NUMBER_WORDS:
        return float(NUMBER_WORDS[s.lower()])
    matches = list(_NUMBER.finditer(s))
    if len(matches) != 1:
        return None
    match = matches[0]
    before, after = s[: match.start()].strip(), s[match.end() :].strip()
    if before or (after and not re.fullmatch(r"[A-Za-z][A-Za-z\s]*", after)):
        return None  # a number inside an expression ("3\sqrt{2}", "2\pi", "1.5x")
    return _to_float(match)


def last_number(text: str) -> float | None:
    """The last number in free text; the last number word (zero-twenty) if there are no digits."""
    numbers = find_numbers(text)
    if numbers:
        return numbers[-1]
    words = _NUMBER_WORD.findall(text)
    return float(NUMBER_WORDS[words[-1].lower()]) if words else None


# ----------------------------------------------------------------------------- choices


def choice_letter(index: int) -> str:
    return LETTERS[index]


def _norm_text(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def extract_choice(text: str, choices: tuple[str, ...] | list[str]) -> int | None:
    """The chosen option's index, read from a letter (``"B"``, ``"(B)"``, ``"B. cat"``) or the option text.

    The span is first narrowed with :func:`extract_answer`. A letter is accepted when it stands
    alone or opens the span; otherwise the option whose text the span equals (normalised) wins;
    otherwise the single option whose text occurs in the span. Ambiguity returns None.
    """
    n = len(choices)
    valid = LETTERS[:n]
    span = extract_answer(text).text.strip()
    letter = re.fullmatch(r"\(?\s*([A-Z])\s*\)?[.:]?", span)
    if letter is None:
        letter = re.match(r"^\(?([A-Z])(?:[).:]\s|\)$|\s*$)", span)
    if letter is None:
        letter = re.match(r"^(?:option|choice)\s*\(?([A-Z])\)?\b", span, re.I)
    if letter and letter.group(1).upper() in valid:
        return valid.index(letter.group(1).upper())
    normed = _norm_text(span)
    norm_choices = [_norm_text(c) for c in choices]
    if normed in norm_choices and norm_choices.count(normed) == 1:
        return norm_choices.index(normed)
    contained = [i for i, c in enumerate(norm_choices) if c and re.search(rf"\b{re.escape(c)}\b", normed)]
    if len(contained) == 1:
        return contained[0]
    if len(contained) > 1:  # "red square" contains "square": prefer the longest option if it covers the others
        longest = max(contained, key=lambda i: len(norm_choices[i]))
        if all(norm_choices[i] in norm_choices[longest] for i in contained):
            return longest
    return None


# ----------------------------------------------------------------------------- boxes

_BRACKETED_BOX = re.compile(
    r"[\[(]\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*[\])]"
)
_PLAIN_BOX = re.compile(
    r"(?<![\d.])(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)(?![\d.])"
)


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``x1, y1, x2, y2`` box in the answer span of ``text`` (bracketed or plain), or None."""
    span = extract_answer(text).text
    for pattern in (_BRACKETED_BOX, _PLAIN_BOX):
        match = pattern.search(span) or pattern.search(text)
        if match:
            x1, y1, x2, y2 = (float(v) for v in match.groups())
            return (x1, y1, x2, y2)
    return None
