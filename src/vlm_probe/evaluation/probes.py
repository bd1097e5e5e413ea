"""The published localization probes on evaluation datasets, graded by the harness.

* :func:`swap_localization`: vision-token swap on swap pairs (target answer accuracy, change
  rate, flip-to-source rate, transition layer), graded per task (numbers, boxes by IoU, ...).
* :func:`ablation_localization`: one decoder layer made the identity at a time, on VQA or
  text-only reasoning items, graded against their gold answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..analyses.ablation import AblationResult, layer_ablation_sweep
from ..analyses.generation import greedy_config
from ..analyses.swap import SwapResult, vision_swap_sweep
from ..errors import DatasetError
from ..model.inputs import Batch, align
from .conditions import PromptFormat, Request, build_requests
from .datasets import EvalDataset
from .grading import grade


def _prepare(vlm: Any, requests: Sequence[Request]) -> Batch:
    images = [[image.open() for image in r.images] or None for r in requests]
    return vlm.prepare([r.prompt for r in requests], images)


def _grader(request: Request) -> Any:
    return lambda prediction: grade(prediction, request.answer, kind=request.kind, choices=request.choices,
                                    iou_threshold=request.iou_threshold).correct


def swap_localization(
    vlm: Any,
    pairs: EvalDataset[Any],
    *,
    layers: Sequence[int] | None = None,
    mode: str = "from",
    fmt: PromptFormat | None = None,
    max_new_tokens: int = 16,
    max_rows: int = 64,
    progress: bool = True,
) -> SwapResult:
    """Vision-token swap localization on a swap-pair dataset (see :func:`~vlm_probe.analyses.vision_swap_sweep`).

    ``target_correct`` and ``flipped_to_source`` are graded with the harness (per task kind:
    numbers, boxes by IoU, text); the result gains ``id`` and ``task`` columns.
    """
    if pairs.kind != "swap":
        raise DatasetError(f"swap_localization needs swap pairs; got a {pairs.kind} dataset.")
    targets = build_requests(pairs, "target", fmt)
    sources = build_requests(pairs, "source", fmt)
    target_batch, source_batch = align(_prepare(vlm, targets), _prepare(vlm, sources))
    result = vision_swap_sweep(
        vlm, target_batch, source_batch, layers=layers, mode=mode, grader=[_grader(r) for r in targets],
        source_grader=[_grader(r) for r in sources],
        max_rows=max_rows, progress=progress, generation_config=greedy_config(vlm, max_new_tokens),
    )
    frame = result.frame
    frame["id"] = [targets[s].id for s in frame["sample"]]
    frame["task"] = [targets[s].task for s in frame["sample"]]
    frame["target_answer"] = [str(targets[s].answer) for s in frame["sample"]]
    frame["source_answer"] = [str(sources[s].answer) for s in frame["sample"]]
    return SwapResult(frame, {**result.meta, "dataset": str(getattr(pairs, "source", ""))})


def ablation_localization(
    vlm: Any,
    items: EvalDataset[Any],
    *,
    condition: str | None = None,
    layers: Sequence[int] | None = None,
    fmt: PromptFormat | None = None,
    max_new_tokens: int = 16,
    max_rows: int = 64,
    progress: bool = True,
) -> AblationResult:
    """Layer-ablation localization on VQA or text-only items, graded by the harness."""
    condition = condition or ("text" if items.kind == "text" else "image")
    requests = build_requests(items, condition, fmt)
    batch = _prepare(vlm, requests)
    result = layer_ablation_sweep(
        vlm, batch, answers=[str(r.answer) for r in requests], layers=layers, level="answer",
        grader=[_grader(r) for r in requests], max_rows=max_rows, progress=progress,
        generation_config=greedy_config(vlm, max_new_tokens),
    )
    frame = result.frame
    frame["id"] = [requests[s].id for s in frame["sample"]]
    frame["category"] = [requests[s].category for s in frame["sample"]]
    return AblationResult(frame, {**result.meta, "condition": condition})
