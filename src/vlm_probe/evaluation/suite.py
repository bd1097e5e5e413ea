"""One call for the fine-grained metrics of a model: runs the five conditions, then scores them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .datasets import EvalDataset
from .metrics import FineGrained, fine_grained_metrics
from .runner import evaluate


def evaluate_fine_grained(
    model: Any,
    *,
    general: EvalDataset[Any] | str | os.PathLike | None = None,
    math: EvalDataset[Any] | str | os.PathLike | None = None,
    reasoning: EvalDataset[Any] | str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    name: str = "model",
    n_resamples: int = 2000,
    level: float = 0.95,
    **options: Any,
) -> FineGrained:
    """Run the conditions behind M_vis, M_v2r and M_rea and compute them.

    ``general`` (VQA) runs with ``image`` and ``blank``; ``math`` (VQA with descriptions)
    with ``image`` and ``description``; ``reasoning`` (text items) with ``text``. With
    ``out``, each set is a resumable run in ``out/<set>/`` and the metrics are saved to
    ``out/fine_grained``. ``options`` go to :func:`~vlm_probe.evaluation.runner.evaluate`
    (``batch_size``, ``max_new_tokens``, ``system``, ``prompt``, ``generate``, ``quiet``, ...).
    """
    plan = {"general": (general, ["image", "blank"]), "math": (math, ["image", "description"]),
            "reasoning": (reasoning, ["text"])}
    runs = {}
    for key, (data, conditions) in plan.items():
        if data is None:
            continue
        run_out = Path(out) / key if out is not None else None
        runs[key] = evaluate(model, data, conditions=conditions, out=run_out, name=f"{name}:{key}", **options)
    result = fine_grained_metrics(**runs, model=name, n_resamples=n_resamples, level=level)
    if out is not None:
        result.save(Path(out) / "fine_grained")
    return result
