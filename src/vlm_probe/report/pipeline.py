"""The main job's orchestration: run each analysis section, save its tables atomically, record
what ran on how many items, and what was skipped and why.

Nothing here draws or judges: :mod:`.claims` judges the saved tables and :mod:`.render` draws
them. A section either runs (its tables are written to ``out/<name>.parquet`` as it finishes),
is skipped (the reason and the flag or file that would enable it are recorded), or fails (the
error is recorded; the other sections still run).

With ``Options.workers`` above 1 the sections run side by side in spawned single-threaded
processes (:func:`run_in_workers`), longest first; each process builds its own
:class:`Pipeline` and the parent reads the saved tables back, so what follows is unchanged.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..arch.regions import Cuts
from ..errors import InputError
from ..io import atomic_file, atomic_write_text
from .claims import ClaimParameters
from .inputs import DATA_ROLES, Inputs, describe_sample, stratified


@dataclass
class Options:
    """Options of the main job (all recorded in ``run.json``).

    Attributes:
        samples: items per probe (swap pairs, ablation items, prompts for patching, attention,
            lens, drift), a task-stratified sample; ``None`` (the default) takes every item given.
        eval_items: items per dataset in the transfer table (task-stratified); ``None``: all.
        max_new_tokens: tokens generated per answer; ``None`` reads ``generation.max_new_tokens``
            (or ``max_new_tokens``) from the data folder's ``manifest.json``, else 32.
        cuts: where mid and late start (``(8, 20)`` or ``"8,20"``); default N//3, 2N//3.
        merge_host: where each merge variant's vision tower, projector, embeddings and head
            come from: ``"early"`` (the early third's source, as published) or a checkpoint name.
        chunk: prompts per forward batch in the prompt-only analyses, and answers generated per
            batch in the transfer table; ``None``: 128 on the built-in testbed (a 1 M-parameter
            model on a CPU, where generating 128 answers at once took 0.6 of the time of 4 x
            32), else 32.
        max_rows: rows per batched patching or swap forward (the memory budget).
        freezing: run the testbed's freezing re-runs.
        claims: the claims' margins and thresholds.
        load: :func:`vlm_probe.load` options (dtype, device_map, attn_implementation).
        workers: processes that run the sections side by side, one torch thread each; 1 runs
            them here, one after another. ``None`` (the default): see :meth:`resolved_workers`.
            A script that calls ``analyze`` with more than one worker needs the usual
            ``if __name__ == "__main__":`` guard (the workers are spawned).
    """

    samples: int | None = None
    eval_items: int | None = None
    max_new_tokens: int | None = None
    cuts: tuple[int, int] | str | None = None
    merge_host: str = "early"
    chunk: int | None = None
    max_rows: int = 64
    quiet: bool = False
    freezing: bool = True
    claims: ClaimParameters = field(default_factory=ClaimParameters)
    load: dict[str, Any] = field(default_factory=dict)
    workers: int | None = None

    def resolved_workers(self, n_sections: int) -> int:
        """``workers`` if given; else 1 when the load options may place the models on an accelerator
        (a large model must not be loaded twice on one GPU), else the usable cores
        (:func:`vlm_probe.threads.default_workers`), at most ``n_sections``."""
        if self.workers is not None:
            if self.workers < 1:
                raise InputError(f"workers must be at least 1, got {self.workers}.")
            return self.workers
        placement = self.load.get("device_map")
        places = placement.values() if isinstance(placement, dict) else [placement]
        if any(where is not None and str(where) != "cpu" for where in places):
            return 1
        from ..threads import default_workers

        return max(1, min(default_workers(), n_sections))

    def record(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "claims"}, "claims": self.claims.as_dict()}


#: The sections the parallel path starts first, longest first (wall seconds on the built-in testbed,
#: measured with 2 workers: transfer 108, drift 27, cross-patching 21, attention 20, swap 12; freezing
#: reads the responses the build kept, 1.4 s); the other sections are short and follow in report order.
COST_ORDER = ("transfer", "drift", "cross_patching", "attention", "swap")

#: Appended to the failure of the sections a dead worker process took down: the usual causes.
_DIED = (" A worker process died: out of memory, a crash, or a script that calls analyze() without the "
         "`if __name__ == \"__main__\":` guard (the workers are spawned and import the script). --workers 1 "
         "(Options(workers=1)) runs the sections in this process.")

#: ``(id, title, function)`` of each section (see :data:`vlm_probe.report.sections.SECTIONS`).
Section = tuple[str, str, Callable[["Pipeline", "SectionRecord"], None]]


class Skip(Exception):
    """A section that cannot run on this data: ``reason`` and what would enable it."""

    def __init__(self, reason: str, enable: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.enable = enable


@dataclass
class SectionRecord:
    """What one section did: status (``ran``, ``skipped``, ``failed``), its samples, tables, time."""

    id: str
    title: str
    status: str = "ran"
    reason: str = ""
    enable: str = ""
    samples: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class Pipeline:
    """Runs the sections of :data:`vlm_probe.report.sections.SECTIONS` on one IN/RL pair."""

    def __init__(self, inputs: Inputs, out: Path, options: Options) -> None:
        self.inputs = inputs
        self.out = Path(out)
        self.options = options
        self.records: list[SectionRecord] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.workers = 1
        self._models: Any = None
        self._datasets: dict[str, Any] = {}
        self.max_new_tokens, self.max_new_tokens_source = inputs.max_new_tokens(options.max_new_tokens)

    # ------------------------------------------------------------------ shared state

    def log(self, message: str) -> None:
        if not self.options.quiet:
            print(message, file=sys.stderr)

    @property
    def models(self) -> Any:
        if self._models is None:
            from ..model import load_set

            self._models = load_set(IN=str(self.inputs.checkpoints["IN"]), RL=str(self.inputs.checkpoints["RL"]),
                                    options=self.options.load)
        return self._models

    @property
    def chunk(self) -> int:
        """Prompts per batch (:attr:`Options.chunk`, resolved)."""
        if self.options.chunk is not None:
            return max(1, self.options.chunk)
        return 128 if self.inputs.testbed is not None else 32

    @property
    def cuts(self) -> Cuts:
        return Cuts.make(self.options.cuts, self.models["IN"].n_layers)

    def fmt(self) -> Any:
        from ..evaluation.conditions import PromptFormat

        values = self.inputs.prompt_format
        if "blank_color" in values:
            values["blank_color"] = tuple(values["blank_color"])
        return PromptFormat(**values)

    def dataset(self, key: str) -> Any:
        """Every item of the data file with role ``key`` (loaded once), or None."""
        from ..evaluation.datasets import load_dataset, load_swap_pairs

        path = self.inputs.data.get(key)
        if path is None:
            return None
        if key not in self._datasets:
            self._datasets[key] = load_swap_pairs(path) if key == "swap" else load_dataset(path)
        return self._datasets[key]

    def sample(self, key: str, n: int | None) -> Any:
        """A task-stratified sample of at most ``n`` items of role ``key`` (None: every item)."""
        data = self.dataset(key)
        return None if data is None or not len(data) else stratified(data, n)

    def need(self, *keys: str, what: str) -> None:
        """Skip the section unless one of the data roles ``keys`` is present."""
        if not any(self.dataset(k) is not None and len(self.dataset(k)) for k in keys):
            files = " or ".join(DATA_ROLES[k] for k in keys)
            raise Skip(f"{what} needs {files}; --data has none.", f"--data with {files}")

    def save_table(self, record: SectionRecord, name: str, frame: pd.DataFrame) -> None:
        """Write ``out/<name>.parquet`` atomically (a killed run leaves no half table)."""
        frame = frame.reset_index(drop=True)
        with atomic_file(self.out / f"{name}.parquet") as f:
            frame.to_parquet(f, index=False)
        self.tables[name] = frame
        record.tables.append(name)

    def save_figure(self, record: SectionRecord, name: str, figure: Any) -> None:
        """Keep a figure that needs the model's inputs to draw (e.g. over an image) as plotly JSON."""
        atomic_write_text(self.out / "figures" / f"{name}.json", figure.to_json())
        record.figures.append(name)

    def described(self, items: Any, what: str, key: str) -> str:
        full = self.dataset(key)
        return describe_sample(list(items), what, len(full) if full is not None else None)

    # ------------------------------------------------------------------ prompts

    def prompts(self, n: int | None, *, images: bool) -> tuple[list[Any], list[str]]:
        """Requests for the prompt-only analyses: the items with images pooled (math and general
        VQA, swap pairs' targets), or text items when there are none and ``images`` is False; then
        a task-stratified sample. Returns the requests and a description per role."""
        from ..evaluation.conditions import build_requests

        roles = [("math", "image", "math VQA items"), ("general", "image", "general VQA items"),
                 ("swap", "target", "swap targets")]
        if not images and not any(self.dataset(key) is not None and len(self.dataset(key)) for key, _, _ in roles):
            roles = [("reasoning", "text", "text items")]
        pool: list[tuple[str, str, Any]] = []
        for key, condition, what in roles:
            data = self.dataset(key)
            if data is None or not len(data):
                continue
            pool += [(key, what, r) for r in build_requests(stratified(data, n), condition, self.fmt())]
        requests = [r for _, _, r in pool]
        if n is not None and len(requests) > n:  # stratify the pool again, by task
            kept = {id(r) for r in stratified(_Pool(requests), n).items}
            pool = [entry for entry in pool if id(entry[2]) in kept]
            requests = [r for _, _, r in pool]
        described = []
        for key, what, _ in dict.fromkeys((k, w, None) for k, w, _ in pool):
            described.append(self.described([r for k, _, r in pool if k == key], what, key))
        return requests, described

    def section_prompts(self, rec: SectionRecord, what: str, *, images: bool) -> list[Any]:
        """:meth:`prompts` for one section: its sample recorded in ``rec``; :class:`Skip` (naming
        ``what`` the section is) when the data holds none."""
        requests, described = self.prompts(self.options.samples, images=images)
        if not requests:
            if images:
                raise Skip(f"{what} needs prompts with images; --data has none.",
                           "--data with swap pairs or VQA items (images)")
            raise Skip(f"{what} needs prompts; --data has none.", "--data with any data file")
        rec.samples += described
        return requests

    def batches(self, requests: list[Any]) -> Iterator[tuple[int, Any]]:
        """``(offset, batch)`` chunks of at most ``options.chunk`` prompts."""
        step = self.chunk
        for start in range(0, len(requests), step):
            part = requests[start : start + step]
            images = [[image.open() for image in r.images] or None for r in part]
            if all(i is None for i in images):
                images = None
            yield start, self.models.prepare([r.prompt for r in part], images)

    # ------------------------------------------------------------------ running

    def run(self, sections: tuple[Section, ...]) -> None:
        """Run ``sections``: here, one after another, or in :func:`run_in_workers` when
        :meth:`Options.resolved_workers` is above 1. ``records`` keep the order of ``sections``."""
        self.workers = min(self.options.resolved_workers(len(sections)), len(sections))
        if self.workers <= 1:
            self.records += [run_section(self, *section) for section in sections]
        else:
            self.records += run_in_workers(self, sections, self.workers)

    @property
    def failures(self) -> dict[str, str]:
        return {r.id: r.reason for r in self.records if r.status == "failed"}


def run_section(pipeline: Pipeline, name: str, title: str, fn: Callable[[Pipeline, SectionRecord], None]
                ) -> SectionRecord:
    """Run one section and record it: ``ran``, ``skipped`` (:class:`Skip`, or ``--no-freezing``) or
    ``failed`` (any other exception, recorded: the other sections still run)."""
    record = SectionRecord(name, title)
    if name == "freezing" and not pipeline.options.freezing:
        record.status, record.reason, record.enable = "skipped", "--no-freezing was given.", "leave out --no-freezing"
        return record
    start = time.perf_counter()
    pipeline.log(f"[vlm-probe] {title} ...")
    try:
        fn(pipeline, record)
    except Skip as skip:
        record.status, record.reason, record.enable = "skipped", skip.reason, skip.enable
    except Exception as error:  # a failed section is reported; the others still run
        record.status, record.reason = "failed", f"{type(error).__name__}: {error}"
    record.seconds = time.perf_counter() - start
    return record


def run_in_workers(pipeline: Pipeline, sections: tuple[Section, ...], workers: int) -> list[SectionRecord]:
    """Run ``sections`` in ``workers`` spawned processes, longest first (:data:`COST_ORDER`), then read
    the tables they saved into ``pipeline.tables``. Returns the records in the order of ``sections``.

    A worker records skips and failures as :func:`run_section` does here. An exception that
    escapes a worker is recorded as that section's failure, with its text; a worker process that
    crashes breaks the pool, so every section still running or queued then fails with it.
    """
    order = sorted(sections, key=lambda s: COST_ORDER.index(s[0]) if s[0] in COST_ORDER else len(COST_ORDER))
    records: dict[str, SectionRecord] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_worker, pipeline.inputs, pipeline.out, pipeline.options, section): section
                   for section in order}
        for future in as_completed(futures):
            name, title, _ = futures[future]
            try:
                records[name] = future.result()
            except Exception as error:  # the worker process died, or its result could not come back
                hint = _DIED if isinstance(error, BrokenProcessPool) else ""
                records[name] = SectionRecord(name, title, status="failed",
                                              reason=f"{type(error).__name__}: {error}{hint}")
    ordered = [records[name] for name, _, _ in sections]
    for record in ordered:
        for table in record.tables:
            pipeline.tables[table] = pd.read_parquet(pipeline.out / f"{table}.parquet")
    return ordered


def _worker(inputs: Inputs, out: Path, options: Options, section: Section) -> SectionRecord:
    """One section in a worker process: its own :class:`Pipeline` (models load here), one torch thread."""
    import transformers

    from ..threads import torch_threads

    # no weight-loading bars: several workers' bars would interleave on one terminal, and the
    # parent already says which section starts
    transformers.utils.logging.disable_progress_bar()
    with torch_threads(1):
        return run_section(Pipeline(inputs, out, options), *section)


@dataclass(frozen=True)
class _Pool:
    """A list of requests that :func:`stratified` can sample (it reads ``.items`` and ``task``)."""

    items: tuple[Any, ...]

    def __init__(self, items: list[Any]) -> None:
        object.__setattr__(self, "items", tuple(items))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.items)
