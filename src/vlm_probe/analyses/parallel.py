"""Data parallelism over samples, switched on explicitly (``parallel="accelerate"``).

Pass ``parallel="accelerate"`` (or ``options=RunOptions(parallel="accelerate")``) to a sweep
and run the script with ``accelerate launch --multi_gpu --num_processes N script.py`` (on a
CPU-only machine the processes talk over gloo; ``torchrun --nproc_per_node N`` works too):
each process takes a contiguous share of the samples, metrics and graders receive the global
sample ids of the rows they score, and every process gets back the full table, in the same
order and with the same numbers as a single process would produce.

Nothing is sharded unless asked: a sweep inside a larger torchrun job (``WORLD_SIZE`` set)
still runs every sample in every process. A backend is any object with ``rank``, ``size``
and ``gather(obj) -> list`` (one entry per process).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import pandas as pd

from ..errors import InputError


class Parallel(Protocol):
    """How a sweep shares its samples among processes."""

    rank: int
    size: int

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        ...


@dataclass(frozen=True)
class SingleProcess:
    """No parallelism: this process runs every sample."""

    rank: int = 0
    size: int = 1

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


class Accelerate:
    """Processes started by ``accelerate launch`` (or torchrun): gloo on CPU-only machines."""

    def __init__(self) -> None:
        import torch
        from accelerate import PartialState

        self._state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = int(self._state.process_index)
        self.size = int(self._state.num_processes)

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))

    def __repr__(self) -> str:
        return f"Accelerate(rank={self.rank}, size={self.size})"


def backend(parallel: Parallel | str | None) -> Parallel:
    """The backend a ``parallel`` option names: ``None`` (one process), ``"accelerate"``, or a backend."""
    if parallel is None or parallel == "none":
        return SingleProcess()
    if parallel == "accelerate":
        return Accelerate()
    if isinstance(parallel, str):
        raise InputError(f"Unknown parallel backend {parallel!r}; use None or 'accelerate' (or pass a backend object).")
    return parallel


def world(parallel: Parallel | str | None = None) -> tuple[int, int]:
    """``(process_index, num_processes)`` of a backend (one process unless asked)."""
    chosen = backend(parallel)
    return chosen.rank, chosen.size


def shard_indices(n: int, parallel: Parallel | str | None = None) -> list[int]:
    """The sample indices this process handles (contiguous blocks, as even as possible)."""
    rank, size = world(parallel)
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(range(start, stop))


def gather_frame(frame: pd.DataFrame, sort: Sequence[str] = (), parallel: Parallel | str | None = None) -> pd.DataFrame:
    """Concatenate every process's rows (all processes receive the result), sorted by ``sort``."""
    chosen = backend(parallel)
    if chosen.size > 1:
        parts = [f for f in chosen.gather(frame) if len(f)]
        frame = pd.concat(parts, ignore_index=True) if parts else frame
    keys = [c for c in sort if c in frame.columns]
    if keys and len(frame):
        frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    return frame
