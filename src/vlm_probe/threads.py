"""How many CPU threads torch uses: one decision for the whole project.

On the small machines vlm_probe is often run on, torch's default (one intra-op thread per
core) collapses when another process holds a core: the threads wait on each other at every
operation. Measured on a 2-core machine with one other busy process, a testbed training step
went from 0.25 s to 4-20 s with two threads and kept its speed with one; `vlm-probe weights`
took 153-169 s instead of 6 s. :func:`default_threads` therefore leaves a core per busy
process and never uses more than half the machine's cores; ``VLM_PROBE_THREADS`` overrides it.
Parallel work (the testbed's RL runs) goes to separate single-threaded processes instead, which
share a busy machine without collapsing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

ENV = "VLM_PROBE_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$VLM_PROBE_THREADS`` if set, else ``min(cores // 2, cores - busy)``, at least 1, where
    ``busy`` is the 1-minute load average rounded up (1 on a 2-core machine)."""
    if os.environ.get(ENV):
        value = os.environ[ENV]
        if not value.isdigit() or int(value) < 1:
            from .errors import InputError

            raise InputError(f"{ENV}={value!r}: give a whole number of threads, at least 1.")
        return int(value)
    cores = usable_cores()
    return max(1, min(cores // 2, idle_cores()))


def idle_cores(sample: float = 0.0) -> int:
    """Usable cores minus the busy ones, at least 1. Busy: the 1-minute load average rounded up,
    or with ``sample > 0`` (seconds) the machine's busy share measured now from ``/proc/stat``
    (Linux; the load average elsewhere), which unlike the load average does not lag a job that
    just ended (a ``pip install`` before a build)."""
    cores = usable_cores()
    busy_now = _busy_cores(sample) if sample > 0 else None
    if busy_now is not None:
        return max(1, min(cores, round(cores - busy_now)))
    try:
        busy = math.ceil(os.getloadavg()[0] - 0.25)
    except (AttributeError, OSError):
        busy = 0
    return max(1, cores - max(0, busy))


def _busy_cores(seconds: float) -> float | None:
    """Cores' worth of CPU time the whole machine spent busy over ``seconds`` (None off Linux)."""

    def read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    first = read()
    time.sleep(seconds)
    second = read()
    if first is None or second is None or second[0] <= first[0]:
        return None
    total, idle = second[0] - first[0], second[1] - first[1]
    return (os.cpu_count() or 1) * (total - idle) / total


def default_workers() -> int:
    """Processes for independent single-threaded jobs: the usable cores (at least 1, at most 4)."""
    return max(1, min(4, usable_cores()))


def data_parallel_processes(workers: int, shards: int) -> int:
    """Processes for one data-parallel job: at most ``workers`` and ``shards``, and only the idle
    cores. Unlike independent jobs, data parallelism costs CPU (each process repeats the
    optimizer step and works on smaller batches) and waits for the slowest process at every
    step, so on a busy machine one process is faster."""
    return max(1, min(workers, shards, idle_cores(sample=0.5)))


@contextmanager
def torch_threads(n: int | None = None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads (None: :func:`default_threads`); restored after."""
    wanted = default_threads() if n is None else int(n)
    if wanted < 1:
        from .errors import InputError

        raise InputError(f"threads must be at least 1, got {n}.")
    before = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)
