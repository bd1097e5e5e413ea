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
    GramSpectra,
    delta_grams,
    StreamingDeltaOperator,
    effective_rank,
    exact_svd,
    gram_tolerance,
    materialize_delta,
    randomized_svd,
    subspace_overlap,
    values_from_eigenvalues,
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


def test_only_randomized_mode_approximates() -> None:
    for mode in ("auto", "exact"):
        cfg = SVDConfig(mode=mode, top_k=50, device="cpu")
        assert {cfg.method(shape) for shape in [(896, 896), (151936, 896), (4096, 40)]} == {"exact"}
    assert SVDConfig(mode="randomized", top_k=50).method((151936, 896)) == "randomized"
    assert SVDConfig(mode="randomized", top_k=50).method((60, 60)) == "exact"  # top-k covers the whole spectrum
    with pytest.raises(ValueError, match="svd mode"):
        SVDConfig(mode="fast")


def _metrics(values: np.ndarray, frob_sq: float) -> dict[str, float]:
    def erank(v: np.ndarray) -> float:
        p = v[v > 0] / v[v > 0].sum()
        return float(np.exp(-(p * np.log(p)).sum()))

    return {"stable_rank": frob_sq / values[0] ** 2, "erank_s": erank(values), "erank_s2": erank(values**2)}


GRAM_CASES = {  # name: (rows, columns, spectrum or None for a random Gaussian delta)
    "gaussian_tall": (300, 70, None),
    "gaussian_wide": (45, 260, None),
    "decaying_tall": (200, 64, 3.0 * 0.9 ** np.arange(64)),
    "power_law_wide": (50, 180, 1.0 / (1.0 + np.arange(50))),
    "low_rank_tall": (160, 48, np.r_[np.linspace(2.0, 1.0, 5), np.zeros(43)]),
}


@pytest.mark.parametrize("case", sorted(GRAM_CASES))
def test_gram_spectra_match_float64_svd_within_their_bound(tmp_path, config_dir, case) -> None:
    m, n, spectrum = GRAM_CASES[case]
    g = torch.Generator().manual_seed(7)
    base = torch.randn(m, n, generator=g)
    delta = torch.randn(m, n, generator=g) if spectrum is None else with_spectrum(m, n, spectrum, seed=8)
    paths = _pair(tmp_path, {"model.layers.0.mlp.up_proj.weight": (base, base + delta)}, config_dir)
    ca, cb = open_checkpoint(paths["A"]), open_checkpoint(paths["B"])
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    sources = [(ca, ca[name]), (cb, cb[name])]
    d = materialize_delta(*sources).double()  # the float32 delta, widened
    exact = torch.linalg.svdvals(d).numpy()
    frob_sq = float((d**2).sum())
    (key, found), = GramSpectra(5, chunk_elements=700).add("t", sources, [(0, 1)], [3], [frob_sq], [True])
    got = found[3]
    s = got.values.numpy()
    assert key == "t" and got.method == "exact" and got.complete and len(s) == min(m, n)
    assert 0 < got.error_bound <= math.sqrt(gram_tolerance(frob_sq, max(m, n), min(m, n))) + 1e-300
    assert got.error_bound < 1e-6 * math.sqrt(frob_sq)  # a bound that means something
    assert np.all(np.abs(s - exact) <= got.error_bound), "every value within the recorded bound"
    np.testing.assert_allclose(s[0], exact[0], rtol=1e-12)
    want, have = _metrics(exact, frob_sq), _metrics(s, frob_sq)
    full_rank = spectrum is None or spectrum.min() > 0
    for metric in want:  # full rank: exact to rounding; zeros of a rank-5 delta come back as ~sqrt(n u) s_1
        assert have[metric] == pytest.approx(want[metric], rel=1e-9 if full_rank else 1e-4), metric
    # top singular vectors: D v_i = s_i u_i on both sides
    left, right = got.left.double(), got.right.double()
    torch.testing.assert_close(left.T @ left, torch.eye(5, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(d @ right, left * got.values[:5], atol=1e-8 * exact[0], rtol=0)


def test_delta_grams_equal_dense_products_tall_and_wide(tmp_path, config_dir) -> None:
    g = torch.Generator().manual_seed(12)
    tensors = {"model.layers.0.mlp.up_proj.weight": (torch.randn(75, 37, generator=g), torch.randn(75, 37, generator=g)),
               "model.layers.0.mlp.down_proj.weight": (torch.randn(37, 75, generator=g), torch.randn(37, 75, generator=g))}
    paths = _pair(tmp_path, tensors, config_dir)
    ca, cb = open_checkpoint(paths["A"]), open_checkpoint(paths["B"])
    for param in ("up_proj", "down_proj"):
        name = f"model.language_model.layers.0.mlp.{param}.weight"
        sources = [(ca, ca[name]), (cb, cb[name]), (ca, ca[name])]
        d = materialize_delta(sources[0], sources[1]).double()
        want = d.T @ d if d.shape[0] >= d.shape[1] else d @ d.T
        for block in (8, 256):  # blocks of the lower triangle, and one block
            got = delta_grams(sources, [(0, 1), (1, 2)], chunk_elements=300, block_size=block)
            torch.testing.assert_close(got[0].tril(), want.tril(), rtol=1e-13, atol=1e-12)  # the lower triangle
            torch.testing.assert_close(got[1].tril(), want.tril(), rtol=1e-13, atol=1e-12)  # -D has the same Gram


def test_gram_bound_catches_float32_gram() -> None:
    """The float64 bound is far tighter than the error of a float32 Gram: a Gram formed in float32 breaks it."""
    d = with_spectrum(400, 120, 1.0 / (1.0 + np.arange(120)) ** 2, seed=9).double()
    exact = torch.linalg.svdvals(d).numpy()
    frob_sq = float((d**2).sum())
    tau = gram_tolerance(frob_sq, 400, 120)
    good, bound = values_from_eigenvalues(torch.linalg.eigvalsh(d.T @ d), tau)
    bad, _ = values_from_eigenvalues(torch.linalg.eigvalsh((d.float().T @ d.float()).double()), tau)
    assert np.all(np.abs(good.numpy() - exact) <= bound)
    assert np.any(np.abs(bad.numpy() - exact) > bound)


def _three_tensors(tmp_path: Path, config_dir: Path) -> dict:
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for i in range(3):  # three tensors of one shape (one Gram size), and a wide one
        a = torch.randn(90, 40, generator=g)
        tensors[f"model.layers.{i}.mlp.up_proj.weight"] = (a, a + 0.1 * torch.randn(90, 40, generator=g))
    a = torch.randn(40, 90, generator=g)
    tensors["model.layers.0.mlp.down_proj.weight"] = (a, a + 0.1 * torch.randn(40, 90, generator=g))
    a = torch.randn(5, 40, generator=g)  # rank 5: a randomized top-4 + 2 covers it, so it is computed exactly
    tensors["model.layers.0.self_attn.k_proj.weight"] = (a, a + 0.1 * torch.randn(5, 40, generator=g))
    return _pair(tmp_path, tensors, config_dir)


def test_batched_across_tensors_equals_per_tensor(tmp_path, config_dir) -> None:
    paths = _three_tensors(tmp_path, config_dir)
    chain = {"A": paths["A"], "B": paths["B"], "C": paths["A"]}  # B->C undoes A->B: two steps, subspaces compared
    one = compare_weights(chain, svd=SVDConfig(top_k=4, batch_bytes=0, device="cpu"), quiet=True).frame
    many = compare_weights(chain, svd=SVDConfig(top_k=4, batch_bytes=2**30, device="cpu"), quiet=True).frame
    mats = one["svd_mode"] == "exact"
    assert mats.sum() == 10 and (one["tensor"] == many["tensor"]).all()
    for column in ("spectral_norm", "stable_rank", "erank_s", "erank_s2", "svd_error_bound", "overlap_left_prev",
                   "overlap_right_prev"):
        np.testing.assert_allclose(many[column], one[column], rtol=1e-12, err_msg=column)
    second = one[mats & (one["step"] == "B->C")]
    np.testing.assert_allclose(second["overlap_left_prev"], 1.0, atol=1e-9)  # the same delta, negated
    bare = compare_weights(chain, svd=SVDConfig(top_k=4, vectors=False), quiet=True).frame
    np.testing.assert_allclose(bare["erank_s"], one["erank_s"], rtol=1e-12)
    assert bare["overlap_left_prev"].isna().all()


def test_aggregates_keep_approximate_spectra_apart(tmp_path, config_dir) -> None:
    paths = _three_tensors(tmp_path, config_dir)
    mixed = compare_weights(paths, svd=SVDConfig(mode="randomized", top_k=4, oversample=2), quiet=True)
    frame = mixed.frame.set_index("tensor")
    up0, down0 = "model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.mlp.down_proj.weight"
    assert frame.loc[up0, "svd_mode"] == "randomized" and math.isnan(frame.loc[up0, "erank_s"])
    assert math.isfinite(frame.loc[up0, "stable_rank"]) and frame.loc[up0, "svd_error_bound"] > 0
    k0 = "model.language_model.layers.0.self_attn.k_proj.weight"
    assert frame.loc[down0, "svd_mode"] == "randomized" and frame.loc[k0, "svd_mode"] == "exact"
    layer = mixed.by_layer().set_index("label").loc["L1"]  # up, down and k of decoder layer 0
    assert layer["n_tensors"] == 3 and layer["n_spectra_approx"] == 2
    assert layer["stable_rank_mean"] == frame.loc[k0, "stable_rank"]  # the exact row alone
    assert layer["erank_s_mean"] == frame.loc[k0, "erank_s"]
    exact = compare_weights(paths, svd="exact", top_k=4, quiet=True)
    assert exact.by_layer()["n_spectra_approx"].sum() == 0
    assert "n_spectra_approx" in mixed.summary() and "n_spectra_approx" not in exact.summary()


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
