"""Weight-space comparison: every metric against an independent numpy computation on checkpoints on disk,
planted differences, old/new key naming, sharding, every family's layout, bad inputs, exports and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_probe.errors import CheckpointError, CheckpointMismatchError, InputError, UnsafeCheckpointError
from vlm_probe.testbed.zoo import FAMILIES
from vlm_probe.weights import (
    CorruptCheckpointError,
    MissingShardError,
    NonFiniteWeightsWarning,
    WeightComparison,
    compare_weights,
    open_checkpoint,
)

NAMES = ("Base", "IN", "RL")
TOP_K = 6

# ----------------------------------------------------------------------------- helpers


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config_from: Path, shards: int = 1) -> Path:
    """A checkpoint directory written directly: config.json copied, safetensors in ``shards`` files."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_from / "config.json", path / "config.json")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, path / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def stored(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def perturb(tensors: dict[str, torch.Tensor], seed: int, scale: float, skip: tuple[str, ...] = ()) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in tensors.items():
        noise = torch.randn(value.shape, generator=g) * scale
        out[name] = value if any(s in name for s in skip) else (value.float() + noise).to(value.dtype)
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, zoo) -> dict[str, Path]:
    """Base (tiny Qwen2.5-VL), IN = Base + noise (vision block 0 untouched), RL = IN + 0.5 (IN - Base) + noise
    (decoder layer 3 untouched), plus a rank-2 update of one matrix."""
    root = tmp_path_factory.mktemp("chain")
    base_dir = zoo("qwen2_5_vl").save(root / "Base")
    base = stored(base_dir)
    inn = perturb(base, 1, 0.02, skip=("visual.blocks.0.",))
    rl = {}
    noise = perturb(inn, 2, 0.01)
    for name in base:
        if "model.layers.3." in name:
            rl[name] = inn[name]
        else:
            rl[name] = inn[name] + 0.5 * (inn[name] - base[name]) + (noise[name] - inn[name])
    g = torch.Generator().manual_seed(3)
    up = "model.layers.1.mlp.up_proj.weight"
    rl[up] = rl[up] + 0.3 * torch.randn(rl[up].shape[0], 2, generator=g) @ torch.randn(2, rl[up].shape[1], generator=g)
    return {
        "Base": base_dir,
        "IN": write_checkpoint(root / "IN", inn, base_dir),
        "RL": write_checkpoint(root / "RL", rl, base_dir),
    }


def arrays(paths: dict[str, Path]) -> dict[str, list[np.ndarray]]:
    """Stored name -> float64 arrays (one per checkpoint), read independently of vlm_probe."""
    loaded = [stored(Path(paths[n])) for n in paths]
    return {name: [t[name].to(torch.float64).numpy() for t in loaded] for name in loaded[0]}


def expected_region(stored_name: str, depth: int, cuts: tuple[int, int]) -> tuple[str, int | None]:
    """Region and unified layer of a transformers-5 Qwen2.5-VL stored name, written out by hand."""
    parts = stored_name.split(".")
    if stored_name.startswith("visual.blocks."):
        return "vision", int(parts[2]) - depth
    if stored_name.startswith("visual.merger."):
        return "projector", 0
    if stored_name.startswith("visual."):
        return "vision", None
    if stored_name.startswith("model.layers."):
        i = int(parts[2])
        return ("early" if i < cuts[0] else "mid" if i < cuts[1] else "late"), i + 1
    if stored_name.startswith("model.embed_tokens."):
        return "embed", None
    return "head", None


def erank(values: np.ndarray) -> float:
    p = values[values > 0] / values[values > 0].sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def svd64(matrix: np.ndarray, compute_uv: bool = True):
    """float64 SVD of a whole matrix. (LAPACK through torch: numpy's threaded OpenBLAS is ~10x slower on a
    loaded 2-core machine; the oracle stays independent: float64, whole tensors, no chunks, no streaming.)"""
    if not compute_uv:
        return torch.linalg.svdvals(torch.from_numpy(matrix)).numpy()
    u, s, vh = torch.linalg.svd(torch.from_numpy(matrix), full_matrices=False)
    return u.numpy(), s.numpy(), vh.numpy()


def oracle(paths: dict[str, Path], k: int) -> pd.DataFrame:
    """Every per-tensor metric of the chain Base->IN->RL, in float64 numpy."""
    rows = []
    for name, (w0, w1, w2) in arrays(paths).items():
        deltas = {"Base->IN": (w1 - w0, w0), "IN->RL": (w2 - w1, w1)}
        svd = {}
        for step, (d, w) in deltas.items():
            row = {"stored": name, "step": step, "energy": float((d**2).sum()), "weight_norm": float(np.linalg.norm(w))}
            if d.ndim >= 2:
                m = d.reshape(d.shape[0], -1)
                u, s, vt = svd64(m)
                svd[step] = (u[:, :k], vt[:k].T)
                if s[0] > 0:
                    row.update(spectral_norm=s[0], stable_rank=row["energy"] / s[0] ** 2, erank_s=erank(s),
                               erank_s2=erank(s**2), topk_energy=float((s[:k] ** 2).sum()) / row["energy"],
                               spectrum=list(s[:k] / s[0]))
            rows.append(row)
        d1, d2 = deltas["Base->IN"][0], deltas["IN->RL"][0]
        prod = d1 * d2
        rows[-1].update(dot_prev=float(prod.sum()), n_sign_agree=int((prod > 0).sum()),
                        n_changed_both=int((prod != 0).sum()))
        if len(svd) == 2 and rows[-1].get("spectral_norm") and rows[-2].get("spectral_norm"):
            for side, i in (("left", 0), ("right", 1)):
                a, b = svd["Base->IN"][i], svd["IN->RL"][i]
                cos = svd64(a.T @ b, compute_uv=False)
                rows[-1][f"overlap_{side}_prev"] = float((np.clip(cos, 0, 1) ** 2).sum() / k)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- metrics against numpy


@pytest.fixture(scope="module")
def exact_result(chain) -> WeightComparison:
    return compare_weights(chain, cuts=(1, 3), svd="exact", top_k=TOP_K, quiet=True)


def test_every_metric_matches_numpy(chain, exact_result) -> None:
    frame = exact_result.to_frame()
    spec_map = {e.stored_name: e.name for e in open_checkpoint(chain["Base"]).tensors.values()}
    want = oracle(chain, TOP_K)
    want["tensor"] = want["stored"].map(spec_map)
    merged = want.merge(frame, on=["tensor", "step"], suffixes=("_np", ""))
    assert len(merged) == len(frame) == len(want) == 2 * len(spec_map)
    close = dict(rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(merged["energy"], merged["energy_np"], **close)
    np.testing.assert_allclose(merged["frob"], np.sqrt(merged["energy_np"]), **close)
    np.testing.assert_allclose(merged["weight_norm"], merged["weight_norm_np"], **close)
    np.testing.assert_allclose(merged["rel_norm"], np.sqrt(merged["energy_np"]) / merged["weight_norm_np"], **close)
    total = merged.groupby("step")["energy_np"].transform("sum")
    np.testing.assert_allclose(merged["energy_share"], merged["energy_np"] / total, **close)
    mats = merged[merged["spectral_norm_np"].notna()]
    assert len(mats) > 60
    for column in ("spectral_norm", "stable_rank", "erank_s", "erank_s2", "topk_energy"):
        np.testing.assert_allclose(mats[column], mats[f"{column}_np"], rtol=1e-4, err_msg=column)
    for got, exp in zip(mats["spectrum"], mats["spectrum_np"]):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-4, atol=1e-6)
    assert set(mats["svd_mode"]) == {"exact"}
    assert ((mats["svd_error_bound"] > 0) & (mats["svd_error_bound"] < 1e-6 * mats["frob"])).all()
    second = merged[merged["step"] == "IN->RL"]
    np.testing.assert_allclose(second["dot_prev"], second["dot_prev_np"], rtol=2e-5, atol=1e-9)
    assert (second["n_sign_agree"] == second["n_sign_agree_np"]).all()
    assert (second["n_changed_both"] == second["n_changed_both_np"]).all()
    first_energy = merged[merged["step"] == "Base->IN"].set_index("tensor")["energy_np"]
    cos = second["dot_prev_np"] / np.sqrt(second["energy_np"] * second["tensor"].map(first_energy))
    ok = np.isfinite(cos)
    np.testing.assert_allclose(second.loc[ok, "cosine_prev"], cos[ok], rtol=2e-5, atol=1e-7)
    assert second.loc[~ok, "cosine_prev"].isna().all()  # vision block 0 did not move in Base->IN
    sub = second[second["overlap_left_prev_np"].notna()]
    assert len(sub) > 25
    for side in ("left", "right"):
        np.testing.assert_allclose(sub[f"overlap_{side}_prev"], sub[f"overlap_{side}_prev_np"], atol=1e-4)
    # the planted rank-2 update shows as a low stable rank in IN->RL only
    up = frame[(frame["tensor"] == "model.language_model.layers.1.mlp.up_proj.weight")].set_index("step")
    assert up.loc["IN->RL", "stable_rank"] < 0.5 * up.loc["Base->IN", "stable_rank"]


def test_layer_index_and_regions_match_hand_mapping(chain, exact_result) -> None:
    frame = exact_result.frame
    base = open_checkpoint(chain["Base"])
    assert base.vision_depths == (2,) and base.n_layers == 4
    by_tensor = frame[frame["step"] == "Base->IN"].set_index("tensor")
    for entry in base.tensors.values():
        region, layer = expected_region(entry.stored_name, depth=2, cuts=(1, 3))
        row = by_tensor.loc[entry.name]
        assert row["region"] == region, entry.stored_name
        assert (None if pd.isna(row["layer"]) else int(row["layer"])) == layer, entry.stored_name
    labels = set(frame["label"])
    assert {"V-2", "V-1", "P", "L1", "L4", "embed", "final_norm", "lm_head"} <= labels
    q = by_tensor.loc["model.language_model.layers.2.self_attn.q_proj.weight"]
    assert (q["component"], q["region"], q["label"]) == ("q", "mid", "L3")


def test_aggregates_match_numpy(chain, exact_result) -> None:
    want = oracle(chain, TOP_K)
    want["region"] = [expected_region(n, 2, (1, 3))[0] for n in want["stored"]]
    regions = exact_result.by_region().set_index(["step", "region"])
    totals = want.groupby("step")["energy"].sum()
    for (step, region), group in want.groupby(["step", "region"]):
        row = regions.loc[(step, region)]
        assert row["n_tensors"] == len(group)
        assert row["energy_share"] == pytest.approx(group["energy"].sum() / totals[step], rel=2e-5)
        assert row["rel_norm"] == pytest.approx(math.sqrt(group["energy"].sum() / (group["weight_norm"] ** 2).sum()), rel=2e-5)
    # cosine of the whole LLM update, concatenated: sum of dots over product of norms
    second = want[(want["step"] == "IN->RL") & want["region"].isin(["early", "mid", "late"])]
    first = want[(want["step"] == "Base->IN") & want["region"].isin(["early", "mid", "late"])]
    llm = exact_result.aggregate(["step", "part"]).set_index(["step", "part"]).loc[("IN->RL", "llm")]
    expected = second["dot_prev"].sum() / math.sqrt(second["energy"].sum() * first["energy"].sum())
    assert llm["cosine_prev"] == pytest.approx(expected, rel=2e-5)
    assert llm["sign_agree_prev"] == pytest.approx(second["n_sign_agree"].sum() / second["n_changed_both"].sum())
    layers = exact_result.by_layer()
    assert layers[layers["step"] == "Base->IN"]["energy_share"].sum() == pytest.approx(1.0)
    assert list(layers[layers["step"] == "Base->IN"]["label"][:4]) == ["V-2", "V-1", "P", "L1"]


def test_bfloat16_checkpoints_are_compared_in_float32(tmp_path, chain) -> None:
    paths = {}
    for name in NAMES:
        tensors = {k: v.to(torch.bfloat16) for k, v in stored(chain[name]).items()}
        paths[name] = write_checkpoint(tmp_path / name, tensors, chain["Base"])
    result = compare_weights(paths, svd="none", quiet=True)
    frame = result.frame.set_index(["tensor", "step"])
    spec_map = {e.stored_name: e.name for e in open_checkpoint(paths["Base"]).tensors.values()}
    for name, (w0, w1, _) in list(arrays(paths).items())[:20]:
        exact = float(((w1 - w0) ** 2).sum())  # bf16 values are exact in float64
        assert frame.loc[(spec_map[name], "Base->IN"), "energy"] == pytest.approx(exact, rel=1e-5, abs=1e-12)
        assert frame.loc[(spec_map[name], "Base->IN"), "dtype"] == "bfloat16"


# ----------------------------------------------------------------------------- planted differences


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_layers_show_zero_delta_everywhere_else(family, zoo, tmp_path) -> None:
    """A pair differing only in decoder layers [1, 3): every other row is exactly zero, in every family."""
    base_dir = zoo(family).save(tmp_path / "base")
    ckpt = open_checkpoint(base_dir)
    assert all(e.location.region.value != "other" for e in ckpt.tensors.values()), family
    planted = {e.stored_name for e in ckpt.tensors.values() if e.location.layer in (2, 3) and e.location.region.value == "llm"}
    assert planted
    tensors = stored(base_dir)
    changed = {k: (v + 0.01 if k in planted else v) for k, v in tensors.items()}
    other = write_checkpoint(tmp_path / "other", changed, base_dir)
    result = compare_weights({"A": base_dir, "B": other}, svd="none", quiet=True, cuts=(1, 3))
    frame = result.frame
    inside = frame["layer"].isin([2, 3]) & (frame["part"] == "llm")
    assert (frame.loc[~inside, "energy"] == 0.0).all() and (frame.loc[~inside, "frob"] == 0.0).all()
    assert (frame.loc[inside, "energy"] > 0).all()
    regions = result.by_region().set_index("region")["energy_share"]
    assert regions.drop("mid").fillna(0).eq(0).all() and regions["mid"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- key naming and sharding

_TO_LEGACY = {  # families saved with module-path names: one legacy naming each, by hand
    "qwen3_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "idefics3": (("model.text_model.", "text_model."), ("model.vision_model.", "vision_model."),
                 ("model.connector.", "connector.")),
}


def _renamed(family: str, tensors: dict[str, torch.Tensor], ckpt) -> dict[str, torch.Tensor]:
    module = {e.stored_name: e.name for e in ckpt.tensors.values()}
    if any(module[k] != k for k in tensors):  # stored with legacy names: write module paths
        return {module[k]: v for k, v in tensors.items()}
    out = {}
    for k, v in tensors.items():
        for old, new in _TO_LEGACY[family]:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava", "idefics3", "mllama"])
def test_old_and_new_key_names_give_identical_tables(family, zoo, tmp_path) -> None:
    base_dir = zoo(family).save(tmp_path / "base")
    tensors = stored(base_dir)
    ckpt = open_checkpoint(base_dir)
    tuned = perturb(tensors, 5, 0.01)
    other_dir = write_checkpoint(tmp_path / "tuned", tuned, base_dir)
    renamed_base = write_checkpoint(tmp_path / "base2", _renamed(family, tensors, ckpt), base_dir, shards=3)
    renamed_tuned = write_checkpoint(tmp_path / "tuned2", _renamed(family, tuned, ckpt), base_dir)
    assert set(stored(other_dir)) != set(load_file(renamed_tuned / "model.safetensors"))
    a = compare_weights({"A": base_dir, "B": other_dir}, svd="exact", top_k=4, quiet=True)
    b = compare_weights({"A": renamed_base, "B": renamed_tuned}, svd="exact", top_k=4, quiet=True)
    key = ["step", "tensor"]
    fa = a.to_frame().sort_values(key).reset_index(drop=True)
    fb = b.to_frame().sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(fa.drop(columns="spectrum"), fb.drop(columns="spectrum"))
    assert all(np.array_equal(x, y) for x, y in zip(fa["spectrum"], fb["spectrum"]))
    # mixed namings across checkpoints line up too
    c = compare_weights({"A": base_dir, "B": renamed_tuned}, svd="none", quiet=True)
    np.testing.assert_array_equal(c.frame.sort_values(key)["energy"].to_numpy(), fa["energy"].to_numpy())


def test_chunking_and_prefetch_do_not_change_results(chain) -> None:
    a = compare_weights(chain, svd="none", quiet=True, prefetch=0)
    b = compare_weights(chain, svd="none", quiet=True, chunk_elements=100, prefetch=3)
    for column in ("energy", "weight_norm", "dot_prev"):
        np.testing.assert_allclose(a.frame[column], b.frame[column], rtol=1e-5)
    np.testing.assert_array_equal(a.frame["n_sign_agree"], b.frame["n_sign_agree"])


def test_norms_only_mode_and_custom_steps(chain, exact_result) -> None:
    norms = compare_weights(chain, svd="none", quiet=True, cuts="1,3")
    assert set(norms.frame["svd_mode"]) == {"none"} and norms.frame["spectral_norm"].isna().all()
    np.testing.assert_allclose(norms.frame["energy"], exact_result.frame["energy"], rtol=1e-6)
    both = compare_weights(chain, steps=[("Base", "IN"), ("Base", "RL")], svd="none", quiet=True)
    assert both.steps == ["Base->IN", "Base->RL"]
    want = arrays(chain)
    frame = both.frame.set_index(["tensor", "step"])
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    w0, w1, w2 = want["model.layers.0.mlp.up_proj.weight"]
    expected = ((w1 - w0) * (w2 - w0)).sum() / np.linalg.norm(w1 - w0) / np.linalg.norm(w2 - w0)
    assert frame.loc[(name, "Base->RL"), "cosine_prev"] == pytest.approx(expected, rel=1e-5)
    layers_only = compare_weights(chain, include=r"language_model\.layers\.0\.", svd="none", quiet=True)
    assert set(layers_only.frame["label"]) == {"L1"}


# ----------------------------------------------------------------------------- NaN / Inf


def test_nonfinite_values_are_reported_not_aggregated(chain, tmp_path) -> None:
    tensors = stored(chain["RL"])
    bad = "model.layers.0.mlp.down_proj.weight"
    tensors[bad] = tensors[bad].clone()
    tensors[bad][0, :3] = float("nan")
    tensors[bad][1, 0] = float("inf")
    rl = write_checkpoint(tmp_path / "RL", tensors, chain["Base"])
    with pytest.warns(NonFiniteWeightsWarning, match="down_proj"):
        result = compare_weights({"Base": chain["Base"], "IN": chain["IN"], "RL": rl}, svd="exact", top_k=4, quiet=True)
    frame = result.frame.set_index(["tensor", "step"])
    row = frame.loc[("model.language_model.layers.0.mlp.down_proj.weight", "IN->RL")]
    assert row["nonfinite"] == "RL: 3 NaN, 1 Inf"
    assert math.isnan(row["energy"]) and math.isnan(row["cosine_prev"]) and row["svd_mode"] == "none"
    first = frame.loc[("model.language_model.layers.0.mlp.down_proj.weight", "Base->IN")]
    assert first["nonfinite"] == "" and first["energy"] > 0
    regions = result.by_region().set_index(["step", "region"])
    assert regions.loc[("IN->RL", "early"), "n_nonfinite"] == 1
    table = result.by_region()
    assert np.isfinite(table[table["step"] == "IN->RL"][["energy", "energy_share", "rel_norm", "cosine_prev"]]).all().all()
    clean = compare_weights(chain, svd="none", quiet=True).frame.set_index(["tensor", "step"])
    expected = clean.xs("IN->RL", level="step")
    expected = expected[(expected["region"] == "early")].drop("model.language_model.layers.0.mlp.down_proj.weight")
    assert regions.loc[("IN->RL", "early"), "energy"] == pytest.approx(expected["energy"].sum(), rel=1e-6)
    assert result.meta["warnings"] and len(result.nonfinite()) == 1


def test_float32_overflow_is_redone_in_float64_not_reported_as_nonfinite(chain, tmp_path) -> None:
    tensors = {"model.layers.0.mlp.up_proj.weight": torch.full((8, 8), 3e19), "model.norm.weight": torch.ones(4),
               "model.layers.0.mlp.position_ids": torch.arange(6)}  # an integer buffer: skipped, listed in meta
    a = write_checkpoint(tmp_path / "a", tensors, chain["Base"])
    tensors = {**tensors, "model.layers.0.mlp.up_proj.weight": torch.full((8, 8), 3.5e19)}
    b = write_checkpoint(tmp_path / "b", tensors, chain["Base"])
    result = compare_weights({"A": a, "B": b}, svd="none", quiet=True)
    row = result.frame.set_index("tensor").loc["model.language_model.layers.0.mlp.up_proj.weight"]
    assert row["nonfinite"] == "" and row["energy"] == pytest.approx(64 * (float(np.float32(3.5e19)) - float(np.float32(3e19))) ** 2)
    assert row["weight_norm"] == pytest.approx(8 * float(np.float32(3e19)))
    assert result.meta["skipped"] == [{"tensor": "model.language_model.layers.0.mlp.position_ids",
                                       "reason": "not floating point (torch.int64)"}]


# ----------------------------------------------------------------------------- bad inputs


def test_different_architectures_are_refused(chain, zoo, tmp_path) -> None:
    llava = zoo("llava").save(tmp_path / "llava")
    with pytest.raises(CheckpointMismatchError, match="LLaVA"):
        compare_weights({"IN": chain["IN"], "RL": llava}, quiet=True)


def test_different_shapes_are_refused_and_named(zoo, tmp_path) -> None:
    a = zoo("qwen2_5_vl").save(tmp_path / "a")
    b = zoo("qwen2_5_vl", d_mlp=96).save(tmp_path / "b")
    with pytest.raises(CheckpointMismatchError, match=r"mlp\.up_proj\.weight: IN \[128, 64\] vs RL \[96, 64\]"):
        compare_weights({"IN": a, "RL": b}, quiet=True)
    tensors = stored(a)
    del tensors["lm_head.weight"]
    c = write_checkpoint(tmp_path / "c", tensors, a)
    with pytest.raises(CheckpointMismatchError, match="only in IN: lm_head.weight"):
        compare_weights({"IN": a, "RL": c}, quiet=True)
    only_llm = compare_weights({"IN": a, "RL": b}, include=r"self_attn|norm", svd="none", quiet=True)
    assert len(only_llm.frame) > 0 and not only_llm.frame["tensor"].str.contains("mlp").any()


def test_missing_shards_and_bad_indexes(chain, tmp_path) -> None:
    tensors = stored(chain["IN"])
    sharded = write_checkpoint(tmp_path / "sharded", tensors, chain["Base"], shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MissingShardError, match="model-00002-of-00003.safetensors"):
        open_checkpoint(sharded)
    (sharded / "model.safetensors.index.json").unlink()  # numbered shards without an index: the gap is found
    with pytest.raises(MissingShardError, match="2 of 3 shards"):
        open_checkpoint(sharded)
    wrong = write_checkpoint(tmp_path / "wrong", tensors, chain["Base"], shards=2)
    index = json.loads((wrong / "model.safetensors.index.json").read_text())
    moved = [k for k, file in index["weight_map"].items() if file.startswith("model-00002")][:2]
    for name in moved:  # every tensor is in the directory; only the index lies about where
        index["weight_map"][name] = "model-00001-of-00002.safetensors"
    (wrong / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="does not hold them"):
        open_checkpoint(wrong)
    truncated = write_checkpoint(tmp_path / "truncated", tensors, chain["Base"])
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match="truncated or damaged"):
        open_checkpoint(truncated)


def test_directory_without_config_or_weights(chain, tmp_path) -> None:
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(chain["IN"] / "model.safetensors", no_config)
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(no_config)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(chain["IN"] / "config.json", no_weights)
    with pytest.raises(CheckpointError, match="has no weights"):
        open_checkpoint(no_weights)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="nor a model in the hub cache"):
        open_checkpoint("nobody/no-such-model-xyz")
    with pytest.raises(InputError, match="0 < mid < late < 4"):
        compare_weights({"IN": chain["IN"], "RL": chain["RL"]}, cuts=(3, 2), quiet=True)
    with pytest.raises(InputError, match="at least two"):
        compare_weights({"IN": chain["IN"]}, quiet=True)


def test_pickle_only_checkpoints_need_opt_in(chain, tmp_path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(chain["RL"] / "config.json", pickled)
    torch.save(stored(chain["RL"]), pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        compare_weights({"IN": chain["IN"], "RL": pickled}, quiet=True)
    opted = compare_weights({"IN": chain["IN"], "RL": pickled}, svd="none", allow_pickle=True, quiet=True)
    safe = compare_weights({"IN": chain["IN"], "RL": chain["RL"]}, svd="none", quiet=True)
    np.testing.assert_array_equal(opted.frame["energy"], safe.frame["energy"])
    assert opted.meta["checkpoints"]["RL"]["format"] == "pickle"


def test_hub_cache_folder_resolves_to_its_snapshot(chain, tmp_path) -> None:
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for file in ("config.json", "model.safetensors"):
        (snapshot / file).symlink_to(chain["IN"] / file)
    ckpt = open_checkpoint(repo)
    assert ckpt.path == snapshot and len(ckpt) == len(open_checkpoint(chain["IN"]))


# ----------------------------------------------------------------------------- results, exports, CLI


def test_result_save_load_exports_and_plots(exact_result, tmp_path) -> None:
    from vlm_probe.results import Result

    exact_result.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert isinstance(back, WeightComparison)
    pd.testing.assert_frame_equal(back.by_region(), exact_result.by_region())
    exact_result.to_parquet(tmp_path / "w.parquet")
    assert len(pd.read_parquet(tmp_path / "w.parquet")) == len(exact_result.frame)
    doc = exact_result.to_json(tmp_path / "w.json")
    on_disk = json.loads((tmp_path / "w.json").read_text())
    assert on_disk["meta"]["steps"] == ["Base->IN", "IN->RL"] and len(on_disk["tensors"]) == len(doc["tensors"])
    assert on_disk["tensors"][0]["prev_step"] is None  # NaN/None become JSON null, not NaN
    fig = exact_result.plot()
    names = {t.name for t in fig.data}
    assert {"Base->IN", "IN->RL"} <= names and len(fig.data) > 4
    assert len(exact_result.plot("layers", metric="energy_share").data) == 2
    assert len(exact_result.plot("regions").data) == 2
    assert len(exact_result.plot("spectra").data) > 4


def test_cli_writes_tables_and_figure(chain, tmp_path, capsys) -> None:
    from vlm_probe.commands.weights import register
    import argparse

    parser = argparse.ArgumentParser(prog="vlm-probe")
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "out"
    args = parser.parse_args(["weights", str(chain["Base"]), str(chain["IN"]), str(chain["RL"]), "--cuts", "1,3",
                              "--svd", "randomized", "--top-k", "4", "--out", str(out), "--quiet"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "early" in printed and "IN->RL" in printed and "energy_share" in printed
    frame = pd.read_parquet(out / "weights.parquet")
    assert set(frame["step"]) == {"Base->IN", "IN->RL"}
    assert json.loads((out / "weights.json").read_text())["meta"]["svd"]["mode"] == "randomized"
    assert (out / "weights.html").stat().st_size > 10_000
    with pytest.raises(InputError, match="--overwrite"):
        args.func(args)
    with pytest.raises(SystemExit):
        parser.parse_args(["weights", "--help"])
    help_text = capsys.readouterr().out
    assert "example:" in help_text and "--svd" in help_text


def test_weights_package_never_imports_the_model_layer() -> None:
    import ast

    import vlm_probe.weights

    root = Path(vlm_probe.weights.__file__).parent
    for file in root.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                target = ",".join(alias.name for alias in node.names)
            else:
                continue
            assert not any(bad in target for bad in ("..model", "vlm_probe.model", "transformers", "nnsight")), (
                f"{file.name} imports {target}"
            )
