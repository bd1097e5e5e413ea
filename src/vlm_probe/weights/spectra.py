"""Singular spectra of weight deltas: exact, randomized top-k with an error bound, and metrics.

A delta ``D = W_b - W_a`` (a tensor viewed as a ``[rows, columns]`` matrix) is reached through a
:class:`MatrixOperator`: :class:`DenseOperator` holds it in float32 (on a GPU when asked);
:class:`StreamingDeltaOperator` never holds it, and computes ``D @ X`` and ``D.T @ Y`` by
re-reading both checkpoints row chunk by row chunk (memory: a few ``[rows, l]`` panels).

Randomized top-k (Halko, Martinsson & Tropp 2011, subspace iteration): ``Q`` (orthonormal,
``l = k + p`` columns) spans ``D @ Omega`` after ``q`` power iterations, and ``s~`` are the singular
values of ``B = Q.T @ D``. With ``R = (I - Q Q.T) D``, ``D.T D = B.T B + R.T R``, so by interlacing and
Weyl's inequality every computed value brackets the true one:

    s~_i <= s_i <= sqrt(s~_i^2 + ||R||_2^2),     ||R||_2 <= ||R||_F = sqrt(||D||_F^2 - ||B||_F^2)

``||D||_F^2`` is known exactly from the norms pass, so the bound costs nothing and holds
deterministically (up to float rounding, covered by a small slack). The recorded
``error_bound`` is the largest ``sqrt(s~_i^2 + rho^2) - s~_i`` over the kept values (the smallest
value's), so it holds for all of them; it is tight when the spectrum decays past ``l``, loose
for flat spectra (then raise ``oversample`` or use exact mode).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from .reader import Checkpoint, TensorEntry
from .streaming import stream

SVDMode = Literal["auto", "exact", "randomized", "none"]

#: relative slack for rounding in ||D||_F^2 - ||B||_F^2 (both float32 arithmetic with float64 sums)
_ROUNDING_SLACK = 1e-5


@dataclass(frozen=True)
class SVDConfig:
    """How spectra are computed.

    Attributes:
        mode: ``exact`` (full SVD, float32), ``randomized`` (top-k), ``auto`` (exact on a GPU or when
            ``rows * cols * min(rows, cols) <= exact_budget``, randomized otherwise), ``none``.
        top_k: singular values kept (spectrum, effective ranks in randomized mode, subspaces).
        oversample: extra random directions in the randomized range finder.
        power_iterations: subspace iterations (each sharpens the top-k estimate).
        exact_budget: ``auto`` picks exact on CPU below this ``m * n * min(m, n)``.
        dense_limit: randomized SVD holds the delta in memory below this many elements and
            streams it from disk above (exact SVD always holds it).
        device: where SVDs run: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        seed: seed of the random test matrices.
    """

    mode: SVDMode = "auto"
    top_k: int = 50
    oversample: int = 10
    power_iterations: int = 2
    exact_budget: float = 4e9
    dense_limit: int = 16 * 2**20
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "exact", "randomized", "none"):
            raise InputError(f"svd mode must be auto, exact, randomized or none, got {self.mode!r}.")
        if self.top_k < 1 or self.oversample < 0 or self.power_iterations < 0:
            raise InputError(
                f"top_k must be >= 1 and oversample, power_iterations >= 0; got {self.top_k}, {self.oversample}, "
                f"{self.power_iterations}."
            )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def method(self, shape: tuple[int, int]) -> str:
        """``exact`` or ``randomized`` for a matrix of ``shape`` (mode ``auto`` decides by size)."""
        if self.mode in ("exact", "randomized"):
            m, n = shape
            if self.mode == "randomized" and self.top_k + self.oversample >= min(m, n):
                return "exact"  # a "top-k" that covers the whole spectrum is the exact SVD
            return self.mode
        m, n = shape
        if self.resolved_device().type != "cpu" or m * n * min(m, n) <= self.exact_budget:
            return "exact"
        return "exact" if self.top_k + self.oversample >= min(m, n) else "randomized"


# ----------------------------------------------------------------------------- operators


class MatrixOperator(Protocol):
    shape: tuple[int, int]
    device: torch.device

    def matmul(self, x: Float[Tensor, "n l"]) -> Float[Tensor, "m l"]: ...

    def rmatmul(self, y: Float[Tensor, "m l"]) -> Float[Tensor, "n l"]: ...


class DenseOperator:
    """A delta held in memory as a float32 ``[m, n]`` tensor."""

    def __init__(self, matrix: Float[Tensor, "m n"]) -> None:
        self.matrix = matrix
        self.shape = (matrix.shape[0], matrix.shape[1])
        self.device = matrix.device

    def matmul(self, x: Tensor) -> Tensor:
        return self.matrix @ x

    def rmatmul(self, y: Tensor) -> Tensor:
        return self.matrix.T @ y


class StreamingDeltaOperator:
    """``D = W_b - W_a`` applied by re-reading both checkpoints row chunk by row chunk."""

    def __init__(
        self,
        a: tuple[Checkpoint, TensorEntry],
        b: tuple[Checkpoint, TensorEntry],
        chunk_elements: int = 1 << 22,
        prefetch: int = 1,
    ) -> None:
        self.sources = [a, b]
        self.shape = a[1].matrix_shape
        self.device = torch.device("cpu")
        self.chunk_elements = chunk_elements
        self.prefetch = prefetch
        self.passes = 0

    def _pass(self, x: Tensor | None, y: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        self.passes += 1
        m, n = self.shape
        out_x = torch.empty(m, x.shape[1]) if x is not None else None
        out_y = torch.zeros(n, y.shape[1], dtype=torch.float64) if y is not None else None
        work = None
        for piece in stream([self.sources], self.chunk_elements, self.prefetch):
            r0, r1 = piece.rows
            if work is None or work.numel() < piece.count:
                work = torch.empty(piece.count, dtype=torch.float32)
            block = work[: piece.count]
            block.copy_(piece.views[1])
            block.sub_(piece.views[0].to(torch.float32))
            block = block.view(r1 - r0, n)
            if out_x is not None:
                torch.matmul(block, x, out=out_x[r0:r1])
            if out_y is not None:
                out_y += (block.T @ y[r0:r1]).to(torch.float64)
        return out_x, (out_y.to(torch.float32) if out_y is not None else None)

    def matmul(self, x: Tensor) -> Tensor:
        return self._pass(x, None)[0]

    def rmatmul(self, y: Tensor) -> Tensor:
        return self._pass(None, y)[1]


def materialize_delta(
    a: tuple[Checkpoint, TensorEntry],
    b: tuple[Checkpoint, TensorEntry],
    device: torch.device | str = "cpu",
    chunk_elements: int = 1 << 22,
) -> Float[Tensor, "m n"]:
    """``W_b - W_a`` as a float32 ``[m, n]`` matrix on ``device``, built chunk by chunk."""
    m, n = a[1].matrix_shape
    out = torch.empty(m, n, dtype=torch.float32, device=device)
    work = None
    for piece in stream([[a, b]], chunk_elements, prefetch=0):
        r0, r1 = piece.rows
        if work is None or work.numel() < piece.count:
            work = torch.empty(piece.count, dtype=torch.float32)
        block = work[: piece.count]
        block.copy_(piece.views[1])
        block.sub_(piece.views[0].to(torch.float32))
        out[r0:r1].copy_(block.view(r1 - r0, n))
    return out


# ----------------------------------------------------------------------------- SVDs


@dataclass
class Spectrum:
    """Top singular values (descending) of one delta, and optionally its top singular vectors."""

    values: Tensor  #: float64, descending; all of them (exact) or the top k (randomized)
    method: str  #: "exact" or "randomized"
    complete: bool  #: True when ``values`` is the whole spectrum
    error_bound: float  #: each true value lies in [value, value + error_bound] (0.0 for exact)
    left: Tensor | None = None  #: [m, k] orthonormal columns
    right: Tensor | None = None  #: [n, k] orthonormal columns
    passes: int = 0  #: reads of the delta from disk (streaming randomized only)
    residual_bound: float = 0.0  #: bound on ||(I - Q Q.T) D||_2 (randomized only)


def exact_svd(matrix: Float[Tensor, "m n"], top_k: int, vectors: bool) -> Spectrum:
    """All singular values of ``matrix`` (float32 LAPACK/cuSOLVER), and the top-k vectors if asked."""
    m, n = matrix.shape
    wide = n > m
    work = matrix.T if wide else matrix  # LAPACK is much faster on tall matrices here
    if vectors:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        k = min(top_k, s.numel())
        left, right = u[:, :k], vh[:k].T
        if wide:
            left, right = right, left
        return Spectrum(s.double().cpu(), "exact", True, 0.0, left.cpu(), right.cpu())
    s = torch.linalg.svdvals(work)
    return Spectrum(s.double().cpu(), "exact", True, 0.0)


def randomized_svd(
    op: MatrixOperator,
    top_k: int,
    frobenius_sq: float,
    *,
    oversample: int = 10,
    power_iterations: int = 2,
    vectors: bool = False,
    generator: torch.Generator | None = None,
) -> Spectrum:
    """Top-k singular values of ``op`` with a deterministic error bound (see module docstring).

    Args:
        op: the matrix, dense or streamed.
        top_k: values kept.
        frobenius_sq: ``||D||_F^2`` (known from the norms pass), for the bound.
        oversample: extra directions ``p`` (the range finder uses ``l = k + p``).
        power_iterations: subspace iterations ``q`` (``2 + 2q`` products with ``D`` or ``D.T``).
        vectors: also return the top-k singular vectors.
        generator: CPU random generator (seeded by the caller for reproducibility).
    """
    m, n = op.shape
    l = min(top_k + oversample, m, n)
    omega = torch.randn(n, l, generator=generator).to(op.device)
    q = torch.linalg.qr(op.matmul(omega)).Q
    for _ in range(power_iterations):
        w = torch.linalg.qr(op.rmatmul(q)).Q
        q = torch.linalg.qr(op.matmul(w)).Q
    bt = op.rmatmul(q)  # D.T @ Q = B.T, [n, l]
    ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
    s64 = s.double().cpu()
    residual_sq = max(0.0, frobenius_sq - float((s64**2).sum())) + _ROUNDING_SLACK * frobenius_sq
    k = min(top_k, s64.numel())
    kept = s64[:k]
    bounds = torch.sqrt(kept**2 + residual_sq) - kept
    spectrum = Spectrum(
        kept, "randomized", k >= min(m, n), float(bounds.max()) if k else math.nan,
        passes=getattr(op, "passes", 0), residual_bound=math.sqrt(residual_sq),
    )
    if vectors:
        spectrum.left = (q @ ub[:, :k]).cpu()
        spectrum.right = vh[:k].T.cpu()
    return spectrum


# ----------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class SpectralMetrics:
    spectral_norm: float
    stable_rank: float  #: ||D||_F^2 / s_1^2
    erank_s: float  #: exp(entropy of s / sum(s))
    erank_s2: float  #: exp(entropy of s^2 / sum(s^2))
    topk_energy: float  #: sum of the top-k s^2 over ||D||_F^2
    spectrum: list[float]  #: top-k s_i / s_1


def effective_rank(values: Tensor) -> float:
    """``exp(H(p))`` with ``p = values / values.sum()`` (zeros dropped); NaN when all are zero."""
    v = values[values > 0].double()
    if v.numel() == 0:
        return math.nan
    p = v / v.sum()
    return float(torch.exp(-(p * torch.log(p)).sum()))


def spectral_metrics(values: Tensor, frobenius_sq: float, top_k: int) -> SpectralMetrics:
    """Metrics of a (possibly truncated) descending spectrum; ``frobenius_sq`` is ``||D||_F^2``."""
    s = values.double()
    s1 = float(s[0]) if s.numel() else 0.0
    if s1 == 0.0:
        return SpectralMetrics(0.0, math.nan, math.nan, math.nan, math.nan, [])
    top = s[:top_k]
    return SpectralMetrics(
        spectral_norm=s1,
        stable_rank=frobenius_sq / s1**2,
        erank_s=effective_rank(s),
        erank_s2=effective_rank(s**2),
        topk_energy=float((top**2).sum()) / frobenius_sq if frobenius_sq > 0 else math.nan,
        spectrum=(top / s1).tolist(),
    )


@dataclass(frozen=True)
class SubspaceOverlap:
    overlap: float  #: mean squared cosine of the principal angles (1: same subspace)
    min_angle_deg: float  #: smallest principal angle, degrees
    chance: float  #: expected overlap of two random k-dim subspaces of the ambient space (k / dim)
    k: int


def principal_cosines(a: Float[Tensor, "d k"], b: Float[Tensor, "d k"]) -> Tensor:
    """Cosines of the principal angles between the column spans of ``a`` and ``b`` (orthonormal)."""
    return torch.linalg.svdvals(a.double().T @ b.double()).clamp(0.0, 1.0)


def subspace_overlap(a: Tensor, b: Tensor) -> SubspaceOverlap:
    k = min(a.shape[1], b.shape[1])
    cos = principal_cosines(a[:, :k], b[:, :k])
    return SubspaceOverlap(
        overlap=float((cos**2).sum()) / k,
        min_angle_deg=math.degrees(math.acos(float(cos.max()))),
        chance=k / a.shape[0],
        k=k,
    )


def delta_spectrum(
    a: tuple[Checkpoint, TensorEntry],
    b: tuple[Checkpoint, TensorEntry],
    frobenius_sq: float,
    config: SVDConfig,
    *,
    vectors: bool,
    generator: torch.Generator,
    chunk_elements: int = 1 << 22,
) -> Spectrum:
    """The spectrum of ``W_b - W_a`` by the method ``config`` picks for its shape."""
    shape = a[1].matrix_shape
    method = config.method(shape)
    device = config.resolved_device()
    if method == "exact":
        return exact_svd(materialize_delta(a, b, device, chunk_elements), config.top_k, vectors)
    numel = shape[0] * shape[1]
    if numel <= config.dense_limit or device.type != "cpu":
        op: MatrixOperator = DenseOperator(materialize_delta(a, b, device, chunk_elements))
    else:
        op = StreamingDeltaOperator(a, b, chunk_elements)
    return randomized_svd(
        op, config.top_k, frobenius_sq, oversample=config.oversample, power_iterations=config.power_iterations,
        vectors=vectors, generator=generator,
    )


def overlaps(spectra: Sequence[Spectrum | None], pairs: Sequence[tuple[int, int]]) -> list[tuple[SubspaceOverlap | None, SubspaceOverlap | None]]:
    """Left and right subspace overlaps for each pair of steps (None where vectors are missing)."""
    out = []
    for s, t in pairs:
        x, y = spectra[s], spectra[t]
        if x is None or y is None or x.left is None or y.left is None:
            out.append((None, None))
            continue
        out.append((subspace_overlap(x.left, y.left), subspace_overlap(x.right, y.right)))
    return out
