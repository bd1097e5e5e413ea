"""Spectra of weight deltas: randomized top-k within its recorded error bound, streamed operators equal dense
ones, effective ranks and principal angles on hand-built cases, GPU parity where a GPU is present."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlm_probe.weights import SVDConfig, compare_weights, open_checkpoint
from vlm_probe.weights.spectra import (
    DenseOperator,
    StreamingDeltaOperator,
    effective_rank,
    exact_svd,
    materialize_delta,
    randomized_svd,
    subspace_overlap,
)


def with_spectrum(m: int, n: int, values: np.ndarray, seed: int) -> torch.Tensor:
    """An m x n float32 matrix whose singular values are ``values`` (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    r = len(values)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    return (u * torch.from_numpy(values) @ v.T).float()


def exact_values(matrix: torch.Tensor) -> np.ndarray:
    return torch.linalg.svdvals(matrix.double()).numpy()


SPECTRA = {
    "decaying": lambda r: 10.0 * 0.8 ** np.arange(r),
    "power_law": lambda r: 1.0 / (1.0 + np.arange(r)),
    "flat": lambda r: np.ones(r) + 0.01 * np.arange(r)[::-1],
}


@pytest.mark.parametrize("kind", sorted(SPECTRA))
@pytest.mark.parametrize("shape", [(300, 120), (90, 400)])
def test_randomized_values_lie_within_their_recorded_bound(kind, shape) -> None:
    m, n = shape
    values = SPECTRA[kind](min(m, n))
    matrix = with_spectrum(m, n, values, seed=1)
    exact = exact_values(matrix)
    frob_sq = float((matrix.double() ** 2).sum())
    k = 10
    got = randomized_svd(DenseOperator(matrix), k, frob_sq, generator=torch.Generator().manual_seed(0))
    s = got.values.numpy()
    assert got.method == "randomized" and len(s) == k and got.error_bound > 0
    tol = 1e-5 * exact[0]
    assert np.all(s <= exact[:k] + tol), "randomized values are lower bounds (interlacing)"
    assert np.all(exact[:k] <= s + got.error_bound + tol), "exact values lie within the recorded bound"
    if kind == "decaying":  # a bound that says something: far below s_1 when the spectrum decays
        assert got.error_bound < 0.01 * exact[0]
        np.testing.assert_allclose(s, exact[:k], rtol=1e-4)


def _pair(tmp_path: Path, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], config_from: Path) -> dict:
    paths = {}
    for i, name in enumerate(("A", "B")):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text((config_from / "config.json").read_text())
        save_file({key: pair[i].contiguous() for key, pair in matrices.items()}, path / "model.safetensors")
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory, zoo) -> Path:
    return zoo("qwen2_5_vl").save(tmp_path_factory.mktemp("config"))


def test_streamed_operator_equals_dense(tmp_path, config_dir) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(70, 33, generator=g).to(torch.bfloat16)
    b = (a.float() + torch.randn(70, 33, generator=g)).to(torch.bfloat16)
    paths = _pair(tmp_path, {"model.layers.0.mlp.up_proj.weight": (a, b)}, config_dir)
    ca, cb = open_checkpoint(paths["A"]), open_checkpoint(paths["B"])
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    source_a, source_b = (ca, ca[name]), (cb, cb[name])
    dense = materialize_delta(source_a, source_b)
    torch.testing.assert_close(dense, b.float() - a.float(), rtol=0, atol=0)
    streamed = StreamingDeltaOperator(source_a, source_b, chunk_elements=100)  # 3 rows per chunk
    x, y = torch.randn(33, 5, generator=g), torch.randn(70, 4, generator=g)
    torch.testing.assert_close(streamed.matmul(x), dense @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streamed.rmatmul(y), dense.T @ y, rtol=1e-5, atol=1e-5)
    before = streamed.passes
    one = randomized_svd(streamed, 5, float((dense**2).sum()), generator=torch.Generator().manual_seed(3))
    two = randomized_svd(DenseOperator(dense), 5, float((dense**2).sum()), generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(one.values, two.values, rtol=1e-4)
    assert streamed.passes - before == 6  # range finder, two power iterations (two passes each), final projection


def test_compare_weights_randomized_mode_within_bound_of_exact_mode(tmp_path, config_dir) -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(400, 160, generator=g) * 0.05
    delta = with_spectrum(400, 160, 0.5 * 0.85 ** np.arange(160), seed=2)
    small_a = torch.randn(64, 64, generator=g)
    paths = _pair(tmp_path, {
        "model.layers.0.mlp.up_proj.weight": (base, base + delta),
        "model.layers.0.self_attn.q_proj.weight": (small_a, small_a + 0.1 * torch.randn(64, 64, generator=g)),
        "model.layers.0.input_layernorm.weight": (torch.ones(64), torch.ones(64) * 1.01),
    }, config_dir)
    cfg = SVDConfig(mode="randomized", top_k=8, oversample=6, dense_limit=0)  # dense_limit=0: stream from disk
    fast = compare_weights(paths, svd=cfg, quiet=True).frame.set_index("tensor")
    exact = compare_weights(paths, svd="exact", top_k=8, quiet=True).frame.set_index("tensor")
    up = "model.language_model.layers.0.mlp.up_proj.weight"
    row, ref = fast.loc[up], exact.loc[up]
    assert row["svd_mode"] == "randomized" and row["svd_k"] == 8 and ref["svd_mode"] == "exact"
    bound = row["svd_error_bound"]
    assert 0 < bound < 0.25 * ref["spectral_norm"] * 0.85**7  # well below the smallest kept value
    s_fast = np.asarray(row["spectrum"]) * row["spectral_norm"]
    s_exact = np.asarray(ref["spectrum"]) * ref["spectral_norm"]
    tol = 1e-5 * ref["spectral_norm"]
    assert np.all(s_fast <= s_exact + tol) and np.all(s_exact <= s_fast + bound + tol)
    np.testing.assert_allclose(s_exact, 0.5 * 0.85 ** np.arange(8), rtol=1e-4)
    assert row["energy"] == ref["energy"]
    # auto on CPU: 64x64 is cheap (exact); a randomized "top-8" of a 64x64 delta is still randomized when asked
    assert fast.loc["model.language_model.layers.0.self_attn.q_proj.weight", "svd_mode"] == "randomized"
    assert fast.loc["model.language_model.layers.0.input_layernorm.weight", "svd_mode"] == "none"


def test_auto_mode_picks_by_size() -> None:
    cpu = SVDConfig(mode="auto", top_k=50, device="cpu")
    assert cpu.method((896, 896)) == "exact"
    assert cpu.method((151936, 896)) == "randomized"
    assert cpu.method((4096, 40)) == "exact"  # top-k covers the whole spectrum
    assert SVDConfig(mode="randomized", top_k=50).method((60, 60)) == "exact"
    with pytest.raises(ValueError, match="svd mode"):
        SVDConfig(mode="fast")


def test_effective_ranks_and_principal_angles_on_known_cases() -> None:
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    p = np.array([0.5, 0.25, 0.25])
    assert effective_rank(torch.tensor(p)) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert math.isnan(effective_rank(torch.zeros(3)))
    eye = torch.eye(6, dtype=torch.float64)
    same = subspace_overlap(eye[:, :2], eye[:, :2])
    assert same.overlap == pytest.approx(1.0) and same.min_angle_deg == pytest.approx(0.0, abs=1e-6)
    orth = subspace_overlap(eye[:, :2], eye[:, 2:4])
    assert orth.overlap == pytest.approx(0.0) and orth.min_angle_deg == pytest.approx(90.0)
    tilted = torch.stack([eye[0], (eye[1] + eye[2]) / math.sqrt(2)], dim=1)
    half = subspace_overlap(eye[:, :2], tilted)  # angles 0 and 45 degrees
    assert half.overlap == pytest.approx((1 + 0.5) / 2) and half.chance == pytest.approx(2 / 6)


def test_exact_svd_vectors_span_the_top_subspaces() -> None:
    matrix = with_spectrum(50, 80, np.linspace(5, 1, 50), seed=4)
    for m in (matrix, matrix.T):  # wide and tall
        got = exact_svd(m, 3, vectors=True)
        recon = got.left.double() @ torch.diag(got.values[:3]) @ got.right.double().T
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        torch.testing.assert_close(recon, (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU SVD path runs only where one is present")
def test_gpu_svd_matches_cpu(tmp_path, config_dir) -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(256, 128, generator=g)
    paths = _pair(tmp_path, {"model.layers.0.mlp.up_proj.weight": (a, a + torch.randn(256, 128, generator=g))}, config_dir)
    gpu = compare_weights(paths, svd=SVDConfig(mode="exact", top_k=8, device="cuda"), quiet=True).frame
    cpu = compare_weights(paths, svd=SVDConfig(mode="exact", top_k=8, device="cpu"), quiet=True).frame
    np.testing.assert_allclose(gpu["spectral_norm"], cpu["spectral_norm"], rtol=1e-4)
    np.testing.assert_allclose(np.stack(gpu["spectrum"]), np.stack(cpu["spectrum"]), rtol=1e-3, atol=1e-5)
    assert json.dumps(gpu["svd_mode"].tolist()) == '["exact"]'
