"""Evaluation harness: datasets, answer extraction and grading, fine-grained metrics, resumable runs.

    from vlm_probe.evaluation import evaluate, load_vqa, fine_grained_metrics
    run = evaluate(vlm, "data/general.jsonl", conditions=["image", "blank"], out="runs/IN/general")
    run.accuracy()                                  # with bootstrap intervals
    fine_grained_metrics(general=run).metrics()     # M_vis with its 2x2 transitions
"""

from .answers import (
    Extraction,
    Reading,
    extract_answer,
    extract_choice,
    last_boxed,
    normalize_span,
    parse_box,
    parse_number,
    read_box,
    read_choice,
    read_number,
    read_yes_no,
    text_candidates,
)
from .conditions import CONDITIONS, PromptFormat, Request, build_requests
from .datasets import (
    BlankImage,
    EvalDataset,
    ImageLoadError,
    ImageRef,
    LoadFailure,
    SwapPair,
    TextItem,
    VQAItem,
    load_dataset,
    load_swap_pairs,
    load_text,
    load_vqa,
    validate_image,
)
from .generation import Generation, GreedyGenerator, generation_defaults, greedy_config
from .grading import Grade, box_iou, grade, infer_kind, math_equal, numbers_close, text_equal
from .metrics import FineGrained, Transition, fine_grained_metrics, m_rea, m_v2r, m_vis, transition_table
from .runner import EvalRun, Grading, RunStats, evaluate, run_requests
from .suite import evaluate_fine_grained

__all__ = [
    "CONDITIONS",
    "BlankImage",
    "EvalDataset",
    "EvalRun",
    "Extraction",
    "FineGrained",
    "Generation",
    "Grade",
    "Grading",
    "GreedyGenerator",
    "ImageLoadError",
    "ImageRef",
    "LoadFailure",
    "PromptFormat",
    "Reading",
    "Request",
    "RunStats",
    "SwapPair",
    "TextItem",
    "Transition",
    "VQAItem",
    "box_iou",
    "build_requests",
    "evaluate",
    "evaluate_fine_grained",
    "extract_answer",
    "extract_choice",
    "fine_grained_metrics",
    "generation_defaults",
    "grade",
    "greedy_config",
    "infer_kind",
    "last_boxed",
    "load_dataset",
    "load_swap_pairs",
    "load_text",
    "load_vqa",
    "m_rea",
    "m_v2r",
    "m_vis",
    "math_equal",
    "normalize_span",
    "numbers_close",
    "parse_box",
    "parse_number",
    "read_box",
    "read_choice",
    "read_number",
    "read_yes_no",
    "run_requests",
    "text_candidates",
    "text_equal",
    "transition_table",
    "validate_image",
]
