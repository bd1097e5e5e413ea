"""Data-parallel supervised stages: one testbed SFT stage in several single-threaded processes.

A supervised stage (:func:`vlm_probe.testbed.train.sft`) splits each batch into the recipe's
fixed shards (``SFTStage.shards``). :func:`train_stage` runs the shards of every batch in
``world`` spawned processes, one torch thread each, that draw the same example stream, compute
their shards' gradients and sum them with ``torch.distributed`` (gloo, a file store: no
network). Each process takes an identical optimizer step, and rank 0 saves the checkpoint.
With ``world=1`` the shards run one after the other in this process; with 2 shards both give
bit-identical weights (tested), so the number of processes is an execution detail, never part
of the recipe.

Why processes and not threads: on a 2-core machine two torch threads collapse when another
process holds a core (:mod:`vlm_probe.threads`); two single-threaded processes share the
machine without waiting on each other at every operation.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import torch

from ..errors import VLMProbeError
from ..threads import torch_threads

#: How long a process waits for the others at a gradient sum before giving up.
SYNC_TIMEOUT = timedelta(minutes=10)


class DataParallelError(VLMProbeError):
    """A data-parallel training process failed; the message holds its traceback."""


@dataclass(frozen=True)
class StageJob:
    """One process's share of a supervised stage (picklable)."""

    recipe: dict[str, Any]
    stage: str  #: ``"base"`` or ``"instruct"``
    start: str  #: checkpoint directory the stage starts from
    out: str  #: checkpoint directory rank 0 writes
    exclude: frozenset[str]
    rank: int
    world: int
    store: str  #: file for torch.distributed's rendezvous
    result: str  #: JSON file this process writes its outcome to
    quiet: bool


def sum_over_processes(group: Any) -> Any:
    """A :data:`~vlm_probe.testbed.train.Reduce` that all-reduces (sums) over ``group``:
    the gradients as one flat buffer, the totals in float64."""
    import torch.distributed as dist

    def reduce(grads: list[torch.Tensor], totals: torch.Tensor) -> None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        dist.all_reduce(totals, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    return reduce


def run_stage_job(job: StageJob) -> None:
    """Entry point of one process: join the group, train its shards, rank 0 saves; writes
    ``{"losses", "cpu_s"}`` or ``{"error"}`` to ``job.result``."""
    import torch.distributed as dist

    from .build import _hf_bars, load_stage_model, save_checkpoint, stage_examples
    from .recipe import Recipe
    from .train import sft

    cpu = time.process_time()
    outcome: dict[str, Any]
    try:
        with torch_threads(1), _hf_bars(job.quiet):
            dist.init_process_group("gloo", init_method=f"file://{job.store}", rank=job.rank,
                                    world_size=job.world, timeout=SYNC_TIMEOUT)
            try:
                recipe = Recipe.from_dict(job.recipe)
                config = getattr(recipe, job.stage)
                model, processor, encoder = load_stage_model(Path(job.start))
                stream, _ = stage_examples(recipe, job.stage, job.exclude)
                losses = sft(model, encoder, stream, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                             warmup=config.warmup, weight_decay=config.weight_decay, shards=config.shards,
                             rank=job.rank, world=job.world, reduce=sum_over_processes(None),
                             desc="Base" if job.stage == "base" else "IN", quiet=job.quiet or job.rank > 0)
                if job.rank == 0:
                    save_checkpoint(model, processor, encoder, Path(job.out))
            finally:
                dist.destroy_process_group()
        outcome = {"losses": losses, "cpu_s": time.process_time() - cpu}
    except BaseException as error:  # reported to the parent, which raises it
        outcome = {"error": f"{type(error).__name__}: {error}\n{traceback.format_exc()}"}
    Path(job.result).write_text(json.dumps(outcome))


def train_stage(recipe: Any, stage: str, start: Path, out: Path, exclude: frozenset[str], *, world: int,
                quiet: bool) -> tuple[list[float], float]:
    """Train one supervised stage of ``recipe`` from the checkpoint ``start`` in ``world``
    spawned processes; rank 0 writes the checkpoint ``out``. Returns the losses per step and the
    CPU seconds of all processes. Raises :class:`DataParallelError` if any process fails (the
    others are stopped)."""
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="vlm_probe-dp-") as scratch:
        jobs = [StageJob(recipe.to_dict(), stage, str(start), str(out), exclude, rank, world,
                         str(Path(scratch) / "store"), str(Path(scratch) / f"rank{rank}.json"), quiet)
                for rank in range(world)]
        processes = [context.Process(target=run_stage_job, args=(job,), daemon=True) for job in jobs]
        for process in processes:
            process.start()
        outcomes: dict[int, dict[str, Any]] = {}
        try:
            running = dict(enumerate(processes))
            while running:  # a process that fails stops the others (they would wait at the next sum)
                wait([process.sentinel for process in running.values()])
                for rank in [r for r, process in running.items() if not process.is_alive()]:
                    process = running.pop(rank)
                    path = Path(jobs[rank].result)
                    outcomes[rank] = json.loads(path.read_text()) if path.is_file() else {
                        "error": f"the process exited with code {process.exitcode} before reporting"}
                    if "error" in outcomes[rank]:
                        for other in running.values():
                            other.terminate()
        finally:
            for process in processes:
                if process.is_alive():
                    process.terminate()
                process.join()
    errors = [f"rank {k}: {o['error']}" for k, o in sorted(outcomes.items()) if "error" in o]
    if errors:
        raise DataParallelError(f"Data-parallel {stage} training failed:\n" + "\n".join(errors))
    return outcomes[0]["losses"], float(sum(o["cpu_s"] for o in outcomes.values()))
