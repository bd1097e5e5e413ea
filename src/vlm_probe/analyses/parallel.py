"""Data parallelism over samples under ``accelerate launch`` (a no-op in a single process).

Run any sweep script with ``accelerate launch --multi_gpu --num_processes N script.py`` (on a
CPU-only machine the processes talk over gloo; ``torchrun --nproc_per_node N`` works too): each process
takes a contiguous share of the samples, and every process gets back the full table, in the
same order and with the same numbers as a single process would produce.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd


def _state() -> Any | None:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines
    return state if state.num_processes > 1 else None


def world() -> tuple[int, int]:
    """``(process_index, num_processes)``."""
    state = _state()
    return (0, 1) if state is None else (state.process_index, state.num_processes)


def shard_indices(n: int) -> list[int]:
    """The sample indices this process handles (contiguous blocks, as even as possible)."""
    rank, size = world()
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return list(range(start, stop))


def gather_frame(frame: pd.DataFrame, sort: Sequence[str] = ()) -> pd.DataFrame:
    """Concatenate every process's rows (all processes receive the result), sorted by ``sort``."""
    state = _state()
    if state is not None:
        from accelerate.utils import gather_object

        frame = pd.concat([f for f in gather_object([frame]) if len(f)], ignore_index=True)
    keys = [c for c in sort if c in frame.columns]
    if keys and len(frame):
        frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    return frame
