"""Per-tensor delta statistics from one streaming pass: norms, energies, cosine, sign agreement.

For checkpoints ``W_0 .. W_c`` of one tensor and steps ``s = (a -> b)`` (delta ``D_s = W_b - W_a``),
one pass over aligned chunks accumulates, in float32 arithmetic with float64 sums across chunks:

* ``||W_a||^2`` for every checkpoint that starts a step (for relative norms),
* ``||D_s||^2`` (the step's energy) for every step,
* for each compared pair of steps ``(s, t)``: ``<D_s, D_t>`` (cosine numerator), the number of
  entries where both changed (``D_s * D_t != 0``) and where they changed in the same direction
  (``D_s * D_t > 0``).

A NaN or Inf anywhere shows up as a non-finite sum; :func:`nonfinite_counts` then counts the
bad entries per checkpoint so the caller can report them instead of averaging them in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .reader import Checkpoint, TensorEntry
from .streaming import stream


@dataclass
class TensorNorms:
    """Sums for one tensor (float64 Python floats and ints)."""

    weight_sq: list[float]  #: per checkpoint; NaN where not needed
    delta_sq: list[float]  #: per step
    dot: list[float]  #: per compared pair of steps
    agree: list[int]  #: per pair: entries with D_s * D_t > 0
    changed: list[int]  #: per pair: entries with D_s * D_t != 0
    nonfinite: dict[int, tuple[int, int]] = field(default_factory=dict)  #: checkpoint -> (NaN count, Inf count)

    def finite(self) -> bool:
        values = [*self.delta_sq, *self.dot, *(w for w in self.weight_sq if not math.isnan(w))]
        return all(math.isfinite(v) for v in values)


class NormKernel:
    """Accumulates :class:`TensorNorms` over the pieces of one tensor.

    Args:
        n_sources: checkpoints per piece.
        steps: ``(a, b)`` source indices; delta ``b - a``.
        pairs: ``(s, t)`` step indices to compare (cosine, sign agreement).
        dtype: working precision (float32; float64 to redo a tensor whose float32 sums overflowed).
    """

    def __init__(
        self,
        n_sources: int,
        steps: Sequence[tuple[int, int]],
        pairs: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_sources = n_sources
        self.steps = list(steps)
        self.pairs = list(pairs)
        self.dtype = dtype
        self.weight_sources = sorted({a for a, _ in self.steps})
        self._size = 0

    def new(self) -> TensorNorms:
        return TensorNorms(
            weight_sq=[0.0 if i in self.weight_sources else math.nan for i in range(self.n_sources)],
            delta_sq=[0.0] * len(self.steps),
            dot=[0.0] * len(self.pairs),
            agree=[0] * len(self.pairs),
            changed=[0] * len(self.pairs),
        )

    #: elements per inner step: the working set (a few float32 buffers) stays in cache
    inner: int = 1 << 18

    def _workspace(self, count: int) -> None:
        if count <= self._size:
            return
        self._w = [torch.empty(count, dtype=self.dtype) for _ in range(self.n_sources)]
        self._d = [torch.empty(count, dtype=self.dtype) for _ in self.steps]
        self._p = torch.empty(count, dtype=self.dtype)
        self._mask = np.empty(count, dtype=bool)
        self._size = count

    def update(self, acc: TensorNorms, views: Sequence[torch.Tensor]) -> None:
        """Add one piece (``views[i]``: flat tensor of source ``i``, any float dtype)."""
        total = views[0].numel()
        self._workspace(min(total, self.inner))
        n_w, n_s = len(self.weight_sources), len(self.steps)
        sums = torch.empty(n_w + n_s + len(self.pairs), dtype=self.dtype)  # one sync per step, not per sum
        for start in range(0, total, self.inner):
            n = min(self.inner, total - start)
            w = [buf[:n] for buf in self._w]
            for i, view in enumerate(views):
                w[i].copy_(view[start:start + n])
            for j, i in enumerate(self.weight_sources):
                torch.dot(w[i], w[i], out=sums[j])
            d = [buf[:n] for buf in self._d]
            for s, (a, b) in enumerate(self.steps):
                torch.sub(w[b], w[a], out=d[s])
                torch.dot(d[s], d[s], out=sums[n_w + s])
            if self.pairs:
                p = self._p[:n]
                p_np = p.numpy()
                mask = self._mask[:n]
                for k, (s, t) in enumerate(self.pairs):
                    torch.mul(d[s], d[t], out=p)
                    torch.sum(p, dim=0, out=sums[n_w + n_s + k])
                    acc.agree[k] += int(np.count_nonzero(np.greater(p_np, 0, out=mask)))
                    acc.changed[k] += int(np.count_nonzero(p_np))
            values = sums.tolist()
            for j, i in enumerate(self.weight_sources):
                acc.weight_sq[i] += values[j]
            for s in range(n_s):
                acc.delta_sq[s] += values[n_w + s]
            for k in range(len(self.pairs)):
                acc.dot[k] += values[n_w + n_s + k]


def nonfinite_counts(checkpoint: Checkpoint, entry: TensorEntry, chunk_elements: int = 1 << 20) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of one stored tensor."""
    nan = inf = 0
    for piece in stream([[(checkpoint, entry)]], chunk_elements, prefetch=0):
        values = piece.views[0]
        nan += int(torch.isnan(values).sum())
        inf += int(torch.isinf(values).sum())
    return nan, inf


def tensor_norms(
    sources: Sequence[tuple[Checkpoint, TensorEntry]],
    steps: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
    chunk_elements: int = 1 << 20,
) -> TensorNorms:
    """One tensor's sums, read on its own (the batch path in :mod:`.compare` streams many at once)."""
    kernel = NormKernel(len(sources), steps, pairs)
    acc = kernel.new()
    for piece in stream([list(sources)], chunk_elements, prefetch=0):
        kernel.update(acc, piece.views)
    return finish_norms(acc, sources, steps, pairs, chunk_elements)


def finish_norms(
    acc: TensorNorms,
    sources: Sequence[tuple[Checkpoint, TensorEntry]],
    steps: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
    chunk_elements: int = 1 << 20,
) -> TensorNorms:
    """Check a finished tensor's sums: count NaN/Inf entries, or redo float32 overflows in float64."""
    if acc.finite():
        return acc
    for i, (ckpt, entry) in enumerate(sources):
        nan, inf = nonfinite_counts(ckpt, entry, chunk_elements)
        if nan or inf:
            acc.nonfinite[i] = (nan, inf)
    if acc.nonfinite:
        return acc
    kernel = NormKernel(len(sources), steps, pairs, dtype=torch.float64)  # float32 sums overflowed
    redo = kernel.new()
    for piece in stream([list(sources)], chunk_elements, prefetch=0):
        kernel.update(redo, piece.views)
    return redo
