"""Answer extraction and grading, table-driven; includes every failure of the published grader."""

from __future__ import annotations

import threading

import pytest

from vlm_probe.evaluation.answers import (
    extract_answer,
    extract_choice,
    find_numbers,
    last_boxed,
    parse_box,
    parse_number,
)
from vlm_probe.evaluation.grading import box_iou, grade, infer_kind, math_equal

# The published grader judged these pairs equal. Both orders must be judged different, whether
# the wrong answer is given bare, stated, tagged or boxed.
PUBLISHED_FAILURES = [
    ("1.5", "5"),
    ("0.25", "25"),
    ("3-\\sqrt{2}", "\\sqrt{2}"),
    ("3\\sqrt{2}", "3\\sqrt{13}"),
    ("2\\pi", "2"),
]
WRAPPERS = ["{}", "The answer is {}.", "<think>so</think><answer>{}</answer>", "Thus \\boxed{{{}}}", "$ {} $"]


@pytest.mark.parametrize("gold,wrong", PUBLISHED_FAILURES + [(b, a) for a, b in PUBLISHED_FAILURES])
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_published_grader_failures_are_judged_wrong(gold, wrong, wrapper) -> None:
    verdict = grade(wrapper.format(wrong), gold)
    assert verdict.correct is False, verdict


@pytest.mark.parametrize("gold,wrong", PUBLISHED_FAILURES)
def test_math_equal_rejects_published_failures_both_ways(gold, wrong) -> None:
    assert not math_equal(gold, wrong)
    assert not math_equal(wrong, gold)
    assert math_equal(gold, gold)


TRUE_POSITIVES = [
    # (gold, response, kind it resolves to)
    ("1.5", "1.5", "number"),
    ("1.5", "The answer is 1.50.", "number"),
    ("0.25", "<answer>1/4</answer>", "number"),
    ("0.25", "\\boxed{\\frac{1}{4}}", "number"),
    ("5", "x = 5", "number"),
    ("1234", "so the total is 1,234", "number"),
    ("3", "There are 3 items in the image.", "number"),
    ("7", "<answer>seven</answer>", "number"),
    ("-2", "The answer is -2", "number"),
    ("3-\\sqrt{2}", "\\boxed{3 - \\sqrt{2}}", "math"),
    ("3\\sqrt{2}", "<answer>\\sqrt{18}</answer>", "math"),
    ("2\\pi", "The area is $2\\pi$.", "math"),
    ("\\frac{\\pi}{2}", "\\boxed{\\pi/2}", "math"),
    ("x+1", "\\boxed{1+x}", "math"),
    ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", "math"),
    ("red circle", "Red circle.", "text"),
]


@pytest.mark.parametrize("gold,response,kind", TRUE_POSITIVES)
def test_true_positives(gold, response, kind) -> None:
    verdict = grade(response, gold)
    assert verdict.kind == kind
    assert verdict.correct, verdict


TRUE_NEGATIVES = [
    ("3", "There are 4 items."),
    ("10", "\\boxed{1}"),
    ("0.5", "<answer>5</answer>"),
    ("12", "The answer is 120."),
    ("x+1", "\\boxed{x-1}"),
    ("red circle", "blue circle"),
    ("3", "I cannot tell."),
    ("3", ""),
]


@pytest.mark.parametrize("gold,response", TRUE_NEGATIVES)
def test_true_negatives(gold, response) -> None:
    assert grade(response, gold).correct is False


@pytest.mark.parametrize(
    "text,expected,source",
    [
        ("reasoning <answer> 42 </answer>", "42", "answer_tag"),
        ("<answer>1</answer> then <answer>2</answer>", "2", "answer_tag"),
        ("<answer>so \\boxed{7}</answer>", "7", "answer_tag"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "boxed"),
        ("\\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}", "boxed"),
        ("The final answer is 1.5.", "1.5", "answer_is"),
        ("Answer: B", "B", "answer_is"),
        ("just 12", "just 12", "full"),
    ],
)
def test_extraction(text, expected, source) -> None:
    extraction = extract_answer(text)
    assert (extraction.text, extraction.source) == (expected, source)


def test_last_boxed_handles_nesting_and_unclosed() -> None:
    assert last_boxed("\\boxed{a{b{c}}d}") == "a{b{c}}d"
    assert last_boxed("\\boxed{1} and \\boxed{2") == "1"  # the unclosed last one is skipped
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    "span,value",
    [("1.5", 1.5), ("0.25", 0.25), (".5", 0.5), ("1,234", 1234.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75),
     ("-7", -7.0), ("12 apples", 12.0), ("x = 3", 3.0), ("$12$", 12.0), ("twelve", 12.0), ("50%", 50.0),
     ("3\\sqrt{2}", None), ("2\\pi", None), ("1.5 or 5", None), ("x2", None), ("", None)],
)
def test_parse_number(span, value) -> None:
    assert parse_number(span) == value


def test_numbers_are_matched_whole() -> None:
    assert find_numbers("1.5 and 0.25 and 10,000 and v2") == [1.5, 0.25, 10000.0]


def test_number_tolerance_is_explicit() -> None:
    assert grade("3.1416", "3.14159", rel_tol=1e-4).correct
    assert not grade("3.1416", "3.14159").correct  # default tolerance is tight
    assert grade("100.4", "100", abs_tol=0.5).correct
    assert not grade("101", "100").correct  # the published 1% relative slack would accept this


CHOICES = ("red circle", "blue square", "green triangle", "square")


@pytest.mark.parametrize(
    "response,index",
    [("B", 1), ("(B)", 1), ("B. blue square", 1), ("The answer is C.", 2), ("<answer>D</answer>", 3),
     ("blue square", 1), ("It is the green triangle.", 2), ("Z", None), ("I don't know", None),
     ("Option A", 0)],
)
def test_extract_choice(response, index) -> None:
    assert extract_choice(response, CHOICES) == index


def test_choice_grading_accepts_letter_or_text_gold() -> None:
    assert grade("B", "B", choices=CHOICES).correct
    assert grade("blue square", "blue square", choices=CHOICES).correct
    assert grade("(B)", 1, choices=CHOICES).correct
    assert not grade("A", "B", choices=CHOICES).correct
    assert grade("A", "B", choices=CHOICES).method == "choice"
    with pytest.raises(ValueError, match="neither a letter"):
        grade("A", "purple", choices=CHOICES)


def test_boxes_by_iou() -> None:
    gold = [0, 0, 10, 10]
    assert box_iou(gold, gold) == 1.0
    assert box_iou(gold, [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou(gold, [20, 20, 30, 30]) == 0.0
    assert box_iou(gold, [10, 10, 0, 0]) == 0.0  # degenerate
    assert parse_box('[{"bbox_2d": [283, 278, 368, 348], "label": "red circle"}]') == (283, 278, 368, 348)
    assert parse_box("The box is 1.5, 2, 30, 40.") == (1.5, 2.0, 30.0, 40.0)
    verdict = grade("<answer>[0, 0, 10, 8]</answer>", gold)
    assert verdict.kind == "box" and verdict.correct and verdict.score == pytest.approx(0.8)
    assert not grade("[5, 0, 15, 10]", gold).correct  # IoU 1/3 < 0.5
    assert grade("[5, 0, 15, 10]", gold, iou_threshold=0.3).correct
    assert grade("no box here", gold).method == "no_answer"


def test_infer_kind() -> None:
    assert infer_kind("12") == "number"
    assert infer_kind("\\frac{1}{2}") == "number"
    assert infer_kind("3\\sqrt{2}") == "math"
    assert infer_kind("red circle") == "text"
    assert infer_kind([1, 2, 3, 4]) == "box"
    assert infer_kind("A", ["x", "y"]) == "choice"


def test_acceptable_answer_lists() -> None:
    assert grade("two", ["2", "3"]).correct
    assert not grade("4", ["2", "3"]).correct


def test_judge_is_off_by_default_and_only_asked_when_rules_say_wrong() -> None:
    calls = []

    def judge(question, gold, response):
        calls.append((question, gold, response))
        return True

    assert grade("5", "5", judge=judge).method == "number" and not calls
    verdict = grade("five-ish", "7", judge=judge, question="How many?")
    assert verdict.correct and verdict.method == "judge"
    assert calls == [("How many?", "7", "five-ish")]
    assert not grade("five-ish", "7").correct


def test_math_equal_works_off_the_main_thread() -> None:
    results = []
    thread = threading.Thread(target=lambda: results.append(
        (math_equal("3\\sqrt{2}", "\\sqrt{18}"), math_equal("3\\sqrt{2}", "3\\sqrt{13}"))))
    thread.start()
    thread.join()
    assert results == [(True, False)]
