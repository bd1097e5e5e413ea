"""Resumable evaluation runs: generate, grade, and append one row per item as it finishes.

:func:`evaluate` scores a model on a dataset under one or more conditions and returns an
:class:`EvalRun`. With ``out=DIR`` every finished item is appended to
``DIR/rows/<condition>.jsonl`` at once; a killed run started again with the same arguments
skips the finished items and ends with the identical table. ``DIR/run.json`` records the
settings (generation config, seed, dtype, attention backend, model path, dataset
fingerprint); a resume with different settings is refused rather than mixed.

:func:`run_requests` is the reusable core: it scores any :class:`~vlm_probe.VLM`, or any
callable that maps a prepared :class:`~vlm_probe.model.inputs.Batch` to texts (a merged or
intervened model), on a list of requests and returns the per-item rows.

Batches are fixed slices of the dataset order, so a resumed run puts every item in the same
batch (same padding) as an uninterrupted run would. If a run died while writing the rows of
one batch, that one batch is generated again and only its missing rows are written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ..errors import GradingError, InputError, VLMProbeError
from ..io import JsonlLog, atomic_write_json, check_writable_dir
from ..results import Result
from ..stats import bootstrap
from .conditions import SUPPORTED, PromptFormat, Request, build_requests
from .datasets import EvalDataset, ImageLoadError, LoadFailure, load_dataset
from .generation import Generation, Generator, GreedyGenerator
from .grading import GRADER_VERSION, Grade, Judge, grade
from .metrics import Transition, correctness, transition_table

#: Columns of the per-item table, in order.
ROW_COLUMNS = ("condition", "index", "id", "status", "error", "category", "task", "prompt", "answer", "response",
               "extracted", "source", "kind", "predicted", "expected", "method", "stage", "reason", "correct", "score",
               "n_new_tokens", "finished")
_VERDICT_COLUMNS = ("extracted", "source", "kind", "predicted", "expected", "method", "stage", "reason", "correct",
                    "score")


@dataclass(frozen=True)
class Grading:
    """Grading options shared by every item of a run (see :func:`~vlm_probe.evaluation.grading.grade`).

    ``rel_tol`` / ``abs_tol``: None compares integers exactly and reals with 1e-6 / 1e-9;
    a value given applies to every number, integers included.
    """

    rel_tol: float | None = None
    abs_tol: float | None = None
    judge: Judge | None = None

    def record(self) -> dict[str, Any]:
        judge = None if self.judge is None else getattr(self.judge, "__qualname__", type(self.judge).__name__)
        return {"rules": GRADER_VERSION, "rel_tol": self.rel_tol, "abs_tol": self.abs_tol, "judge": judge}

    def __call__(self, request: Request, response: str) -> Grade:
        return grade(response, request.answer, kind=request.kind, choices=request.choices, rel_tol=self.rel_tol,
                     abs_tol=self.abs_tol, iou_threshold=request.iou_threshold, judge=self.judge,
                     question=request.question)


@dataclass
class RunStats:
    """What one call did: items in total, taken from the log, generated now, failed."""

    total: int = 0
    resumed: int = 0
    generated: int = 0
    failed: int = 0
    seconds: float = 0.0


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _base_row(request: Request | LoadFailure, condition: str) -> dict[str, Any]:
    if isinstance(request, LoadFailure):
        rec = request.record
        return {"id": request.id, "index": request.index, "condition": condition,
                "category": rec.get("category", rec.get("task")), "task": rec.get("task"),
                "prompt": rec.get("question", rec.get("prompt")), "answer": _jsonable(request.answer(condition))}
    return {"id": request.id, "index": request.index, "condition": condition, "category": request.category,
            "task": request.task, "prompt": request.prompt, "answer": _jsonable(request.answer)}


def error_row(request: Request | LoadFailure, condition: str, reason: str) -> dict[str, Any]:
    """The row of an item that could not be run (``status="error"``, ``correct=None``)."""
    return {**_base_row(request, condition), "status": "error", "error": reason, "response": None,
            **dict.fromkeys(_VERDICT_COLUMNS), "n_new_tokens": None, "finished": None}


def scored_row(request: Request, condition: str, generation: Generation, verdict: Grade) -> dict[str, Any]:
    """The row of a generated and graded item."""
    return {**_base_row(request, condition), "status": "ok", "error": None, "response": generation.text,
            "extracted": verdict.extracted, "source": verdict.source, "kind": verdict.kind,
            "predicted": verdict.predicted, "expected": verdict.expected, "method": verdict.method,
            "stage": verdict.stage, "reason": verdict.reason, "correct": bool(verdict.correct), "score": verdict.score,
            "n_new_tokens": generation.n_tokens, "finished": generation.finished}


def _score(request: Request, condition: str, generation: Generation, grading: Grading) -> dict[str, Any]:
    try:
        verdict = grading(request, generation.text)
    except GradingError as error:  # a gold answer that cannot be graded: a dataset problem, kept per item
        row = error_row(request, condition, f"grading: {error}")
        return {**row, "response": generation.text, "n_new_tokens": generation.n_tokens,
                "finished": generation.finished}
    return scored_row(request, condition, generation, verdict)


def _as_generations(outputs: Sequence[Any], n: int) -> list[Generation]:
    outputs = list(outputs)
    if len(outputs) != n:
        raise VLMProbeError(f"The generator returned {len(outputs)} outputs for a batch of {n}; it must return one "
                            "text (or Generation) per row.")
    return [o if isinstance(o, Generation) else Generation(str(o)) for o in outputs]


def _rng_devices(vlm: Any) -> list[int]:
    try:
        device = next(vlm.hf.parameters()).device
    except (AttributeError, StopIteration):
        return []
    return [device.index or 0] if device.type == "cuda" else []


def _open(request: Request) -> list[Any]:
    return [source.open() for source in request.images]


def _prepare(vlm: Any, chunk: list[Request], system: str | None, condition: str
             ) -> tuple[Any, list[Request], list[dict[str, Any]]]:
    """Open images and prepare a batch; items that cannot be prepared become error rows."""
    ready, images, errors = [], [], []
    for request in chunk:
        try:
            images.append(_open(request) or None)
            ready.append(request)
        except ImageLoadError as error:
            errors.append(error_row(request, condition, f"image: {error}"))
    if not ready:
        return None, [], errors
    try:
        return vlm.prepare([r.prompt for r in ready], images=images, system=system), ready, errors
    except InputError:
        pass
    good, good_images = [], []
    for request, imgs in zip(ready, images):  # find the item(s) that cannot be prepared
        try:
            vlm.prepare([request.prompt], images=[imgs], system=system)
        except InputError as error:
            errors.append(error_row(request, condition, f"prompt: {error}"))
            continue
        good.append(request)
        good_images.append(imgs)
    if not good:
        return None, [], errors
    return vlm.prepare([r.prompt for r in good], images=good_images, system=system), good, errors


def run_requests(
    vlm: Any,
    requests: Sequence[Request],
    *,
    generate: Generator | None = None,
    condition: str = "image",
    batch_size: int = 8,
    max_new_tokens: int = 64,
    system: str | None = None,
    grading: Grading | None = None,
    log: JsonlLog | None = None,
    seed: int = 0,
    quiet: bool = False,
    desc: str | None = None,
) -> tuple[list[dict[str, Any]], RunStats]:
    """Generate and grade ``requests``; return their rows in request order.

    Args:
        vlm: the :class:`~vlm_probe.VLM` whose ``prepare`` builds the batches (and whose
            ``hf.generate`` runs them unless ``generate`` is given).
        requests: from :func:`~vlm_probe.evaluation.conditions.build_requests`.
        generate: a callable ``Batch -> [text or Generation per row]`` (default: greedy
            :class:`~vlm_probe.evaluation.generation.GreedyGenerator` with ``max_new_tokens``).
        condition: the label written into the rows.
        batch_size: rows per batch (left padded).
        log: where finished rows are appended; items already in it are not run again.
        seed: batch ``k`` runs under ``torch.manual_seed(seed + k)`` (scoped), so sampling
            generators are reproducible across resumes too.
        quiet: no progress bar.

    Returns:
        ``(rows, stats)``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}.")
    generate = generate or GreedyGenerator(vlm, max_new_tokens)
    grading = grading or Grading()
    ids = [r.id for r in requests]
    if len(set(ids)) != len(ids):
        raise InputError("Request ids must be unique within a condition.")
    done: dict[Any, dict[str, Any]] = {}
    if log is not None:
        wanted = set(ids)
        done = {row["id"]: row for row in log.read() if row["id"] in wanted}
    stats = RunStats(total=len(requests), resumed=len(done))
    start = time.perf_counter()
    chunks = [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
    new_rows: dict[Any, dict[str, Any]] = {}
    with tqdm(total=len(requests) - len(done), desc=desc or condition, unit="item", disable=quiet,
              dynamic_ncols=True) as bar:
        for k, chunk in enumerate(chunks):
            todo = {r.id for r in chunk if r.id not in done}
            if not todo:
                continue
            batch, ready, errors = _prepare(vlm, chunk, system, condition)
            outputs: list[Generation] = []
            if batch is not None:
                with torch.random.fork_rng(devices=_rng_devices(vlm)):
                    torch.manual_seed(seed + k)
                    outputs = _as_generations(generate(batch), len(ready))
            finished = [_score(r, condition, g, grading) for r, g in zip(ready, outputs)]
            for row in sorted(errors + finished, key=lambda r: r["index"]):
                if row["id"] not in todo:
                    continue  # finished before an interruption; its row is already logged
                if log is not None:
                    log.append(row)
                new_rows[row["id"]] = row
                stats.generated += row["status"] == "ok"
                stats.failed += row["status"] != "ok"
            bar.update(len(todo))
    stats.seconds = time.perf_counter() - start
    rows = [done.get(i) or new_rows[i] for i in ids]
    return rows, stats


# ----------------------------------------------------------------------------- runs


class EvalRun(Result):
    """Per-item rows of an evaluation (one row per condition x item) and the run settings.

    Columns: ``condition, index, id, status ("ok"/"error"), error, category, task, prompt,
    answer, response``, the verdict's audit fields ``extracted, source, kind, predicted,
    expected, method, stage, reason`` (see :class:`~vlm_probe.evaluation.grading.Grade`),
    ``correct, score, n_new_tokens, finished``. ``meta`` holds the settings recorded in
    ``run.json``.
    """

    kind = "eval_run"

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]], meta: dict[str, Any] | None = None) -> EvalRun:
        frame = pd.DataFrame(list(rows), columns=list(ROW_COLUMNS))
        frame["answer"] = [a if isinstance(a, str) or a is None else json.dumps(a) for a in frame["answer"]]
        frame["correct"] = frame["correct"].astype("boolean")
        for col in ("n_new_tokens",):
            frame[col] = frame[col].astype("Int64")
        frame["finished"] = frame["finished"].astype("boolean")
        frame["score"] = frame["score"].astype("Float64")
        for col in ("error", "category", "task", "prompt", "response", "extracted", "source", "kind", "predicted",
                    "expected", "method", "stage", "reason"):
            frame[col] = frame[col].astype("string")
        order = {c: i for i, c in enumerate(dict.fromkeys(frame["condition"]))}
        frame = frame.sort_values(["condition", "index"], key=lambda s: s.map(order) if s.name == "condition" else s,
                                  kind="stable")
        return cls(frame.reset_index(drop=True), meta)

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(self.frame["condition"]))

    def failures(self) -> pd.DataFrame:
        """The rows that could not be run, with their reasons."""
        return self.frame[self.frame["status"] != "ok"][["condition", "id", "error"]].reset_index(drop=True)

    def correct(self, condition: str) -> pd.Series:
        """``id -> correct`` for the items of ``condition`` that ran."""
        return correctness(self, condition)

    def accuracy(self, by: str | Sequence[str] = "condition", *, n_resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> pd.DataFrame:
        """Accuracy with a bootstrap interval per group (``by``: condition, category, task, ...).

        Failed items are left out of ``n`` and counted in ``failed``.
        """
        keys = [by] if isinstance(by, str) else list(by)
        unknown = [k for k in keys if k not in self.frame]
        if unknown:
            raise InputError(f"Cannot group by {unknown}: the rows have columns {', '.join(self.frame.columns)} "
                             "(--by category, task or condition).")
        if "condition" not in keys:
            keys = ["condition", *keys]
        out = []
        for group, part in self.frame.groupby(keys, sort=False, dropna=False):
            ok = part[part["status"] == "ok"]
            est = bootstrap(ok["correct"].astype(bool).astype(float).to_numpy(), n_resamples=n_resamples,
                            level=level, seed=seed)
            group = group if isinstance(group, tuple) else (group,)
            out.append({**dict(zip(keys, group)), "accuracy": est.value, "low": est.low, "high": est.high,
                        "n": est.n, "failed": int((part["status"] != "ok").sum())})
        return pd.DataFrame(out)

    def transitions(self, a: str, b: str) -> Transition:
        """The 2x2 table of items correct/wrong under conditions ``a`` and ``b``."""
        return transition_table(self.correct(a), self.correct(b))

    def plot(self, by: str = "condition", **kwargs: Any) -> Any:
        """Accuracy per condition (and per ``by`` group) with confidence intervals."""
        import plotly.graph_objects as go

        table = self.accuracy(by)
        fig = go.Figure()
        groups = [None] if by == "condition" else list(dict.fromkeys(table[by]))
        for group in groups:
            part = table if group is None else table[table[by] == group]
            fig.add_bar(
                name="accuracy" if group is None else str(group), x=part["condition"], y=part["accuracy"],
                error_y=dict(type="data", symmetric=False, array=part["high"] - part["accuracy"],
                             arrayminus=part["accuracy"] - part["low"]),
            )
        title = self.meta.get("name") or "Evaluation"
        fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1], title=title, **kwargs)
        return fig


def _model_record(vlm: Any) -> dict[str, Any]:
    hf = vlm.hf
    params = list(hf.parameters())
    config = hf.config
    path = getattr(hf, "name_or_path", "") or getattr(config, "_name_or_path", "") or "<in memory>"
    if path != "<in memory>" and Path(path).exists():
        path = str(Path(path).resolve())  # the same checkpoint by another relative path resumes
    return {
        "path": path,
        "family": getattr(getattr(vlm, "spec", None), "name", None),
        "dtype": str(params[0].dtype) if params else None,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "n_parameters": int(sum(p.numel() for p in params)),
    }


def _generator_record(generate: Any) -> dict[str, Any]:
    settings = getattr(generate, "settings", None)
    if isinstance(settings, dict):
        return _jsonable(settings)
    name = getattr(generate, "__qualname__", None) or type(generate).__qualname__
    return {"generator": f"{getattr(generate, '__module__', '')}.{name}"}


def _environment(vlm: Any, batch_size: int) -> dict[str, Any]:
    import transformers

    from .. import __version__

    try:
        device = str(next(vlm.hf.parameters()).device)
    except StopIteration:
        device = "cpu"
    return {"device": device, "batch_size": batch_size, "torch": torch.__version__,
            "transformers": transformers.__version__, "vlm_probe": __version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += _differences(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    return [] if saved == now else [f"{prefix.rstrip('.')}: {saved!r} (saved) vs {now!r} (now)"]


@dataclass
class _RunDir:
    path: Path
    identity: dict[str, Any]
    overwrite: bool = False
    record: dict[str, Any] = field(default_factory=dict)

    def open(self) -> None:
        run_file = self.path / "run.json"
        if run_file.exists() and self.overwrite:
            shutil.rmtree(self.path / "rows", ignore_errors=True)
            shutil.rmtree(self.path / "result", ignore_errors=True)
            run_file.unlink()
        if run_file.exists():
            saved = json.loads(run_file.read_text())
            diffs = _differences(saved.get("identity"), self.identity)
            if diffs:
                raise InputError(
                    f"{self.path} holds a run with other settings, so its rows cannot be resumed: "
                    + "; ".join(diffs[:6])
                    + ". Resume with the same settings, choose another output directory, or pass overwrite=True "
                    "(--overwrite) to discard the old rows."
                )
            self.record = saved
        else:
            self.record = {"identity": self.identity, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_json(run_file, self.record)

    def log(self, condition: str) -> JsonlLog:
        return JsonlLog(self.path / "rows" / f"{condition}.jsonl", key="id")


def evaluate(
    model: Any,
    data: EvalDataset[Any] | str | os.PathLike,
    *,
    conditions: str | Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    generate: Generator | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    system: str | None = None,
    prompt: PromptFormat | None = None,
    grading: Grading | None = None,
    seed: int = 0,
    name: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
) -> EvalRun:
    """Evaluate a model on a dataset under one or more conditions.

    Args:
        model: a :class:`~vlm_probe.VLM` (it prepares the batches; it also generates unless
            ``generate`` is given).
        data: an :class:`~vlm_probe.evaluation.datasets.EvalDataset` or a dataset path
            (layout detected: swap pairs, VQA items or text items).
        conditions: ``image``, ``blank``, ``description``, ``text`` (VQA / text items) or
            ``target``, ``source`` (swap pairs); default: the layout's first
            (``image``, ``text``, ``target``).
        out: run directory; rows are appended there as they finish and a killed run resumes.
        generate: ``Batch -> texts`` callable for merged or intervened models (default: greedy
            generation with an explicit config, see :func:`~vlm_probe.evaluation.generation.greedy_config`).
        batch_size: rows per batch (left padded).
        max_new_tokens: generation budget of the default generator.
        system: a system prompt.
        prompt: how items become prompt text (:class:`~vlm_probe.evaluation.conditions.PromptFormat`).
        grading: tolerances and an optional judge (:class:`Grading`).
        seed: recorded; batch ``k`` runs under seed ``seed + k``.
        name: a label for the run (plots, metadata).
        quiet: no progress bar.
        overwrite: discard the rows of an earlier run in ``out`` with other settings.

    Returns:
        An :class:`EvalRun` (also saved to ``out/result`` when ``out`` is given).
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1 (--batch-size); got {batch_size}.")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1 (--max-new-tokens); got {max_new_tokens}.")
    if out is not None:
        check_writable_dir(out, overwrite=True)  # an existing run directory is resumed
    dataset = data if isinstance(data, EvalDataset) else load_dataset(data)
    if conditions is None:
        conditions = [SUPPORTED[dataset.kind][0]]
    elif isinstance(conditions, str):
        conditions = [conditions]
    conditions = list(dict.fromkeys(conditions))
    prompt = prompt or PromptFormat()
    grading = grading or Grading()
    generate = generate or GreedyGenerator(model, max_new_tokens)
    requests = {c: build_requests(dataset, c, prompt) for c in conditions}  # validates before any work
    identity = _jsonable({
        "model": _model_record(model),
        "generation": _generator_record(generate),
        "dataset": {"kind": dataset.kind, "fingerprint": dataset.fingerprint, "n_items": dataset.n_total},
        "prompt": prompt.record(),
        "system": system,
        "grading": grading.record(),
        "seed": seed,
    })
    run_dir = _RunDir(Path(out), identity, overwrite) if out is not None else None
    if run_dir is not None:
        run_dir.open()
    all_rows: list[dict[str, Any]] = []
    per_condition: dict[str, dict[str, Any]] = {}
    for condition in conditions:
        log = run_dir.log(condition) if run_dir is not None else None
        logged = {row["id"]: row for row in log.read()} if log is not None else {}
        failure_rows = []
        for failure in dataset.failures:  # a resumed run shows the rows it logged, not a fresh load's
            row = logged.get(failure.id)
            if row is None:
                row = error_row(failure, condition, failure.reason)
                if log is not None:
                    log.append(row)
            failure_rows.append(row)
        rows, stats = run_requests(
            model, requests[condition], generate=generate, condition=condition, batch_size=batch_size,
            system=system, grading=grading, log=log, seed=seed, quiet=quiet,
            desc=f"{name or 'eval'}:{condition}",
        )
        stats.total += len(failure_rows)
        stats.failed += len(failure_rows)
        all_rows += rows + failure_rows
        per_condition[condition] = asdict(stats)
    meta = {
        "name": name,
        "conditions": conditions,
        "dataset_source": dataset.source,
        **identity,
        "environment": _environment(model, batch_size),
        "stats": per_condition,
    }
    run = EvalRun.from_rows(all_rows, meta)
    if run_dir is not None:
        run.save(run_dir.path / "result", overwrite=True)
        atomic_write_json(run_dir.path / "run.json", {**run_dir.record, "last_finished": time.strftime(
            "%Y-%m-%dT%H:%M:%S"), "environment": meta["environment"], "stats": per_condition})
    return run
