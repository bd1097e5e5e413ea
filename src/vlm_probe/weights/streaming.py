"""Aligned chunked reads of one tensor from several checkpoints, read ahead in a background thread.

A *job* is one tensor in several checkpoints (same shape, any stored dtypes). :func:`stream`
yields :class:`Piece` objects: the same element range of the flattened tensor from every
source, as 1-D tensors of the stored dtype. Ranges hold whole rows of the tensor viewed as a
matrix (dim 0 by the rest), so a piece reshapes to ``[rows, columns]``.

Reads go into a small pool of reusable buffers (``prefetch + 1`` sets), so memory stays at a
few chunks whatever the model size, and disk reads overlap the caller's arithmetic (file
reads and torch kernels both release the GIL). A piece's buffers are recycled when the
caller asks for the next piece: copy out anything that must outlive the loop step.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass

import torch

from .reader import Checkpoint, TensorEntry

Source = tuple[Checkpoint, TensorEntry]


@dataclass(frozen=True)
class Piece:
    """One element range of one job, read from every source."""

    job: int  #: index of the job in the list given to :func:`stream`
    start: int  #: first element (of the flattened tensor)
    count: int  #: number of elements (whole rows)
    rows: tuple[int, int]  #: ``[first row, end row)`` of the matrix view
    views: tuple[torch.Tensor, ...]  #: one flat tensor per source, stored dtype
    last: bool  #: the job's final piece


def rows_per_chunk(entry: TensorEntry, chunk_elements: int) -> int:
    """Whole rows per piece so a piece holds at most ``chunk_elements`` (at least one row)."""
    columns = max(1, entry.matrix_shape[1])
    return max(1, chunk_elements // columns)


def _ranges(entry: TensorEntry, chunk_elements: int) -> list[tuple[int, int]]:
    rows, columns = entry.matrix_shape
    if entry.numel == 0:
        return []
    step = rows_per_chunk(entry, chunk_elements)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)] if entry.shape else [(0, 1)]


def _buffer_bytes(jobs: Sequence[Sequence[Source]], chunk_elements: int) -> list[int]:
    width = max((len(job) for job in jobs), default=0)
    sizes = [0] * width
    for job in jobs:
        for i, (_, entry) in enumerate(job):
            columns = max(1, entry.matrix_shape[1])
            count = min(entry.numel, rows_per_chunk(entry, chunk_elements) * columns)
            sizes[i] = max(sizes[i], count * entry.itemsize)
    return sizes


def stream(
    jobs: Sequence[Sequence[Source]], chunk_elements: int = 1 << 20, prefetch: int = 2
) -> Iterator[Piece]:
    """Yield the pieces of every job in order, reading ahead ``prefetch`` pieces in a thread.

    Args:
        jobs: per job, the ``(checkpoint, entry)`` sources of one tensor (same shape in all).
        chunk_elements: target elements per piece (rounded down to whole rows, at least one row).
        prefetch: pieces read ahead; 0 reads in the calling thread.
    """
    sizes = _buffer_bytes(jobs, chunk_elements)
    if prefetch <= 0:
        buffers = [torch.empty(size, dtype=torch.uint8) for size in sizes]
        for index, job in enumerate(jobs):
            yield from _read_job(index, job, chunk_elements, buffers)
        return
    yield from _threaded(jobs, chunk_elements, prefetch, sizes)


def _read_job(index: int, job: Sequence[Source], chunk_elements: int, buffers: list[torch.Tensor]) -> Iterator[Piece]:
    with closing(_read_job_lazily(index, job, chunk_elements)) as pieces:
        for emit in pieces:
            yield emit(buffers)


_DONE = object()


def _threaded(jobs: Sequence[Sequence[Source]], chunk_elements: int, prefetch: int, sizes: list[int]) -> Iterator[Piece]:
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(prefetch + 1):
        free.put([torch.empty(size, dtype=torch.uint8) for size in sizes])
    stop = threading.Event()

    def worker() -> None:
        try:
            for index, job in enumerate(jobs):
                with closing(_read_job_lazily(index, job, chunk_elements)) as pieces:
                    for emit in pieces:
                        slot = free.get()
                        if slot is None or stop.is_set():
                            return
                        ready.put((emit(slot), slot))
        except BaseException as error:  # handed to the consumer
            ready.put((error, None))
            return
        ready.put((_DONE, None))

    thread = threading.Thread(target=worker, name="vlm_probe-weight-reader", daemon=True)
    thread.start()
    held = None
    try:
        while True:
            item, slot = ready.get()
            if held is not None:
                free.put(held)
                held = None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            held = slot
            yield item
    finally:
        stop.set()
        free.put(None)  # wake the worker if it waits for a buffer
        thread.join()


def _read_job_lazily(index: int, job: Sequence[Source], chunk_elements: int) -> Iterator:
    """Like :func:`_read_job`, but each step returns a function that reads into a given buffer set."""
    entry = job[0][1]
    columns = max(1, entry.matrix_shape[1])
    ranges = _ranges(entry, chunk_elements)
    with ExitStack() as stack:
        readers = [stack.enter_context(ckpt.reader(src)) for ckpt, src in job]
        for k, (r0, r1) in enumerate(ranges):
            start, count = (r0 * columns, (r1 - r0) * columns) if entry.shape else (0, 1)

            def emit(slot: list[torch.Tensor], start=start, count=count, r0=r0, r1=r1, k=k) -> Piece:
                views = tuple(reader.read(start, count, buf) for reader, buf in zip(readers, slot))
                return Piece(index, start, count, (r0, r1), views, k == len(ranges) - 1)

            yield emit
