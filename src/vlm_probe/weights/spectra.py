"""Singular spectra of weight deltas: exact through Gram eigenvalues, randomized top-k with a bound, metrics.

A delta ``D = W_b - W_a`` (a tensor viewed as a ``[rows, columns]`` matrix, in float32) is reached
through the streaming reader; it is never held whole unless it is wide (then its rows are).

Exact spectra (modes ``exact`` and ``auto``): the eigenvalues ``lambda_i = s_i^2`` of the smaller
Gram matrix ``G = D.T D`` (tall) or ``D D.T`` (wide), accumulated chunk by chunk in float64 and
diagonalised by ``torch.linalg.eigvalsh`` / ``eigh`` on a stack of Grams of one size (the steps of a
tensor, and on a GPU several tensors). Products of float32 entries are exact in float64, so the
only errors are the summation (``|E| <= gamma_m |D|.T |D|``, hence ``||E||_2 <= m u ||D||_F^2``) and the
eigensolver's backward error (``~ n u ||G||_2``). With ``tau = 2 (m + n) u ||D||_F^2`` (``u = 2^-53``,
``m`` the summed dimension, ``n`` the Gram's size) Weyl's inequality gives, for every value,

    sqrt(max(lambda~_i - tau, 0)) <= s_i <= sqrt(lambda~_i + tau)

so ``|s~_i - s_i| <= sqrt(tau)`` (about ``4e-6 ||D||_F`` at ``m = 152k``) and, for large values,
``<= tau / (2 s~_i)``. Squaring the condition number costs only the smallest values: a value below
``sqrt(tau)`` is indistinguishable from zero (an exactly rank-deficient delta shows its zeros as
about ``sqrt(n u) s_1``). The float32 SVD of the published script has absolute errors of about
``n u_32 s_1`` on every value; effective and stable ranks agree with a float64 SVD to about 1e-9
relative on full-rank deltas (tested).

Randomized top-k (Halko, Martinsson & Tropp 2011, subspace iteration; mode ``randomized`` only):
``Q`` (orthonormal, ``l = k + p`` columns) spans ``D @ Omega`` after ``q`` power iterations, and
``s~`` are the singular values of ``B = Q.T @ D``. With ``R = (I - Q Q.T) D``, ``D.T D = B.T B + R.T R``,
so by interlacing and Weyl's inequality every computed value brackets the true one:

    s~_i <= s_i <= sqrt(s~_i^2 + ||R||_2^2),     ||R||_2 <= ||R||_F = sqrt(||D||_F^2 - ||B||_F^2)

The recorded ``error_bound`` is the largest ``sqrt(s~_i^2 + rho^2) - s~_i`` over the kept values. It
is tight when the spectrum decays past ``l`` and loose (many times the true error) for flat
spectra, which is why ``auto`` computes exactly. A truncated spectrum has no effective rank: those
rows carry NaN there, and aggregates leave randomized rows out (see :mod:`.result`).
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
        mode: ``auto`` and ``exact`` (every singular value, from float64 Gram eigenvalues; ``auto``
            is the default name for it), ``randomized`` (top-k with a deterministic bound; its rows
            are marked and kept out of aggregate means), ``none``.
        top_k: singular values kept in ``spectrum`` (and vectors kept for subspace overlaps).
        vectors: compute the top-k singular vectors where a step is compared with another one
            (subspace overlaps); off, exact spectra need only eigenvalues (``eigvalsh``).
        oversample: extra random directions in the randomized range finder.
        power_iterations: subspace iterations (each sharpens the top-k estimate).
        dense_limit: randomized SVD holds the delta in memory below this many elements and
            streams it from disk above.
        batch_bytes: Gram matrices of one size held before one batched eigensolve across tensors;
            ``None``: a tensor's steps only on CPU (no gain from more there), 1 GiB on a GPU.
        device: where Grams and SVDs run: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...
        seed: seed of the random test matrices.
    """

    mode: SVDMode = "auto"
    top_k: int = 50
    vectors: bool = True
    oversample: int = 10
    power_iterations: int = 2
    dense_limit: int = 16 * 2**20
    batch_bytes: int | None = None
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
        if self.batch_bytes is not None and self.batch_bytes < 0:
            raise InputError(f"batch_bytes must be >= 0 or None, got {self.batch_bytes}.")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_batch_bytes(self) -> int:
        """Bytes of Grams batched across tensors (0: per tensor)."""
        if self.batch_bytes is not None:
            return self.batch_bytes
        return 0 if self.resolved_device().type == "cpu" else 2**30

    def method(self, shape: tuple[int, int]) -> str:
        """``exact`` or ``randomized`` for a matrix of ``shape`` (only mode ``randomized`` approximates)."""
        if self.mode == "randomized" and self.top_k + self.oversample < min(shape):
            return "randomized"
        return "exact"  # auto, exact, and a randomized "top-k" that covers the whole spectrum


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
    #: ``|value - true value| <= error_bound`` for every value (randomized: the true value lies in
    #: ``[value, value + error_bound]``; exact from a Gram: see :func:`gram_tolerance`; 0.0 from a
    #: float64 SVD's own viewpoint, i.e. its rounding not counted)
    error_bound: float
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


# ----------------------------------------------------------------------------- exact spectra from Gram matrices

#: unit roundoff of float64
_U64 = 2.0**-53


def gram_tolerance(frobenius_sq: float, summed: int, size: int) -> float:
    """``tau``: bound on ``|lambda~_i - s_i^2|`` for the float64 Gram route (see the module docstring).

    Args:
        frobenius_sq: ``||D||_F^2``.
        summed: the dimension summed over in the Gram (rows of a tall delta, columns of a wide one).
        size: the Gram's size (the smaller dimension).
    """
    return 2.0 * (summed + size) * _U64 * frobenius_sq


def values_from_eigenvalues(eigenvalues: Float[Tensor, " g"], tau: float) -> tuple[Tensor, float]:
    """Descending singular values ``sqrt(max(lambda, 0))`` (float64) from ascending Gram eigenvalues, and the
    largest ``|s~_i - s_i|`` the interval ``[sqrt(max(lambda - tau, 0)), sqrt(lambda + tau)]`` allows."""
    lam = eigenvalues.double().flip(-1)
    values = lam.clamp(min=0.0).sqrt()
    upper = (lam + tau).clamp(min=0.0).sqrt()
    lower = (lam - tau).clamp(min=0.0).sqrt()
    bound = float(torch.maximum(upper - values, values - lower).max()) if values.numel() else 0.0
    return values, bound


def _float_views(piece_views: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    return [v.to(device=device, dtype=torch.float32) for v in piece_views]


def add_gram(gram: Float[Tensor, "g g"], x: Float[Tensor, "r g"], block: int = 256) -> None:
    """``gram += x.T @ x`` on the blocks on and below the diagonal only (about half the multiply-adds of a
    full product when ``g`` spans several blocks). The lower triangle is the Gram; the symmetric
    eigensolvers read nothing else (``UPLO="L"``), so no copy of a possibly large Gram is made."""
    g = x.shape[1]
    for i in range(0, g, block):
        xi = x[:, i:i + block]
        gram[i:i + block, : i + block].addmm_(xi.T, x[:, : i + block])


def delta_grams(
    sources: Sequence[tuple[Checkpoint, TensorEntry]],
    steps: Sequence[tuple[int, int]],
    device: torch.device | str = "cpu",
    chunk_elements: int = 1 << 22,
    block_size: int = 256,
) -> Float[Tensor, "s g g"]:
    """float64 Gram matrices (lower triangles) of the deltas ``sources[b] - sources[a]`` for each step ``(a, b)``.

    A tall delta (``rows >= columns``) gives ``D.T D`` (``g = columns``), summed over row chunks; a wide
    one gives ``D D.T`` (``g = rows``) from its rows, held in float32 on ``device`` while it is read.
    Each delta is formed in float32 (as :func:`materialize_delta`) and widened to float64 exactly;
    ``block_size`` is the column block of :func:`add_gram`. Only the lower triangle is filled.
    """
    device = torch.device(device)
    m, n = sources[0][1].matrix_shape
    tall = m >= n
    g = n if tall else m
    grams = torch.zeros(len(steps), g, g, dtype=torch.float64, device=device)
    held = None if tall else torch.empty(len(steps), m, n, dtype=torch.float32, device=device)
    for piece in stream([list(sources)], chunk_elements, prefetch=1):
        r0, r1 = piece.rows
        views = _float_views(piece.views, device)
        for s, (a, b) in enumerate(steps):
            block = (views[b] - views[a]).view(r1 - r0, n)
            if held is None:
                add_gram(grams[s], block.double(), block_size)
            else:
                held[s, r0:r1] = block
    if held is not None:
        width = max(1, chunk_elements // max(1, m))
        for c0 in range(0, n, width):
            for s in range(len(steps)):
                add_gram(grams[s], held[s, :, c0:c0 + width].T.double(), block_size)
    return grams


def delta_products(
    sources: Sequence[tuple[Checkpoint, TensorEntry]],
    steps: Sequence[tuple[int, int]],
    vectors: Sequence[Float[Tensor, "g k"]],
    device: torch.device | str = "cpu",
    chunk_elements: int = 1 << 22,
) -> list[Tensor]:
    """``D_s @ vectors[s]`` for a tall delta (``[rows, k]``) or ``D_s.T @ vectors[s]`` for a wide one
    (``[columns, k]``), float64, in one read of the sources."""
    device = torch.device(device)
    m, n = sources[0][1].matrix_shape
    tall = m >= n
    out = [torch.zeros(m if tall else n, v.shape[1], dtype=torch.float64, device=device) for v in vectors]
    for piece in stream([list(sources)], chunk_elements, prefetch=1):
        r0, r1 = piece.rows
        views = _float_views(piece.views, device)
        for s, (a, b) in enumerate(steps):
            block = (views[b] - views[a]).view(r1 - r0, n).double()
            if tall:
                out[s][r0:r1] = block @ vectors[s]
            else:
                out[s] += block.T @ vectors[s][r0:r1]
    return out


def _unit_columns(x: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(x, dim=0)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


@dataclass
class _Queued:
    key: object
    sources: Sequence[tuple[Checkpoint, TensorEntry]]
    steps: list[tuple[int, int]]
    ids: list[int]  #: the caller's step index of each delta
    frobenius_sq: list[float]
    vectors: list[bool]
    grams: Tensor  #: [s, g, g] float64


class GramSpectra:
    """Exact spectra of many deltas: Grams formed tensor by tensor, diagonalised in batches of one size.

    ``add`` reads one tensor's deltas into Grams and returns the spectra of every tensor whose batch
    it completed, as ``(key, {step id: Spectrum})``; ``flush`` returns the rest. With
    ``batch_bytes=0`` each tensor's steps form one batch, returned by its own ``add``.
    """

    def __init__(self, top_k: int, device: torch.device | str = "cpu", batch_bytes: int = 0,
                 chunk_elements: int = 1 << 22) -> None:
        self.top_k = top_k
        self.device = torch.device(device)
        self.batch_bytes = batch_bytes
        self.chunk_elements = chunk_elements
        self._queues: dict[int, list[_Queued]] = {}
        self._bytes: dict[int, int] = {}

    def add(
        self,
        key: object,
        sources: Sequence[tuple[Checkpoint, TensorEntry]],
        steps: Sequence[tuple[int, int]],
        ids: Sequence[int],
        frobenius_sq: Sequence[float],
        vectors: Sequence[bool],
    ) -> list[tuple[object, dict[int, Spectrum]]]:
        if not steps:
            return [(key, {})]
        grams = delta_grams(sources, steps, self.device, self.chunk_elements)
        size = grams.shape[-1]
        self._queues.setdefault(size, []).append(
            _Queued(key, sources, list(steps), list(ids), list(frobenius_sq), list(vectors), grams)
        )
        self._bytes[size] = self._bytes.get(size, 0) + grams.numel() * grams.element_size()
        if self._bytes[size] >= self.batch_bytes:
            return self._solve(size)
        return []

    def flush(self) -> list[tuple[object, dict[int, Spectrum]]]:
        out = []
        for size in list(self._queues):
            out.extend(self._solve(size))
        return out

    def _solve(self, size: int) -> list[tuple[object, dict[int, Spectrum]]]:
        queued = self._queues.pop(size)
        self._bytes.pop(size)
        stack = torch.cat([q.grams for q in queued]) if len(queued) > 1 else queued[0].grams
        any_vectors = any(v for q in queued for v in q.vectors)
        if any_vectors:
            eigenvalues, eigenvectors = torch.linalg.eigh(stack, UPLO="L")
        else:
            eigenvalues, eigenvectors = torch.linalg.eigvalsh(stack, UPLO="L"), None
        eigenvalues = eigenvalues.cpu()
        out = []
        offset = 0
        for q in queued:
            m, n = q.sources[0][1].matrix_shape
            tall = m >= n
            k = min(self.top_k, size)
            found: dict[int, Spectrum] = {}
            want = [j for j, v in enumerate(q.vectors) if v]
            tops = {}
            if eigenvectors is not None and want:
                tops = {j: eigenvectors[offset + j].flip(-1)[:, :k] for j in want}
                other = delta_products(q.sources, [q.steps[j] for j in want], [tops[j] for j in want], self.device,
                                       self.chunk_elements)
                tops = {j: (tops[j], _unit_columns(o)) for j, o in zip(want, other)}
            for j, step_id in enumerate(q.ids):
                tau = gram_tolerance(q.frobenius_sq[j], max(m, n), size)
                values, bound = values_from_eigenvalues(eigenvalues[offset + j], tau)
                spectrum = Spectrum(values, "exact", True, bound)
                if j in tops:
                    gram_side, other_side = tops[j]
                    right, left = (gram_side, other_side) if tall else (other_side, gram_side)
                    spectrum.left, spectrum.right = left.cpu(), right.cpu()
                found[step_id] = spectrum
            offset += len(q.steps)
            out.append((q.key, found))
        return out


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
        exact = GramSpectra(config.top_k, device, 0, chunk_elements)
        return exact.add(None, [a, b], [(0, 1)], [0], [frobenius_sq], [vectors])[0][1][0]
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
