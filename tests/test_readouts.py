"""Residual-stream readouts: lens, probes, drift, attention mass, overlays, activation caches."""

from __future__ import annotations

import copy
import importlib
import json

import numpy as np
import pytest
import torch

import vlm_probe
from vlm_probe.analyses.attention_mass import attention_mass, token_attention
from vlm_probe.analyses.collect import Activations, collect
from vlm_probe.analyses.drift import linear_cka, representation_drift
from vlm_probe.analyses.lens import TunedLens, compare_lenses, logit_lens, readout
from vlm_probe.analyses.overlay import cell_grid, overlay_checkpoints, overlay_figure
from vlm_probe.analyses.probes import probe_layers
from vlm_probe.testbed.zoo import FAMILIES, tiny_vlm


@pytest.fixture(scope="module")
def pair():
    """IN and RL checkpoints that differ only in decoder layers [2, 4) of a 5-layer model."""
    base = tiny_vlm("qwen2_5_vl", n_layers=5)
    rl = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in rl.named_parameters():
            idx = next((int(p) for p in name.split(".") if p.isdigit()), None)
            if ".language_model.layers." in name and 2 <= idx < 4 and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    models = vlm_probe.load_set(IN=vlm_probe.load(base), RL=vlm_probe.load(rl, processor=base.processor))
    batch = models.prepare(["how many red circles ?"] * 6, [[base.image(i)] for i in range(6)])
    return models, batch, base


def test_logit_lens_at_last_layer_equals_the_model(pair) -> None:
    models, batch, _ = pair
    vlm = models["IN"]
    result = logit_lens(vlm, batch, positions="last", targets=[5] * len(batch), progress=False)
    last = result.frame[result.frame.layer == vlm.n_layers - 1]
    assert last["kl_to_final"].abs().max() == 0
    acts = collect({"m": vlm}, batch, layers=[vlm.n_layers - 1], groups=("last",), progress=False)
    with torch.no_grad():
        logits = vlm.hf(**batch.inputs).logits[:, -1]
    assert torch.equal(readout(vlm, acts[("m", "layer_out", vlm.n_layers - 1, "last")]), logits)
    probs = logits.softmax(-1)[:, 5]
    torch.testing.assert_close(torch.tensor(last.sort_values("sample")["target_prob"].values, dtype=torch.float32),
                               probs, atol=1e-6, rtol=0)
    assert result.plot() is not None


def test_lens_transfer_reads_states_with_the_other_head(pair) -> None:
    models, batch, _ = pair
    result = logit_lens(models, batch, positions="last", transfer=True, progress=False)
    frame = result.frame
    assert set(zip(frame.checkpoint, frame.readout)) == {("IN", "IN"), ("IN", "RL"), ("RL", "IN"), ("RL", "RL")}
    # the two checkpoints share head and final norm (only layers 2-3 differ): transfer equals own readout
    own = frame[frame.checkpoint == frame.readout].sort_values(["checkpoint", "layer", "sample"])["kl_to_final"].values
    other = frame[frame.checkpoint != frame.readout].sort_values(["checkpoint", "layer", "sample"])["kl_to_final"].values
    np.testing.assert_allclose(own, other, atol=1e-7)


def test_lens_transfer_uses_the_readers_norm_and_head() -> None:
    """RL with its own final norm and unembedding: RL's states read with IN's head, by hand."""
    import torch.nn.functional as F

    base = tiny_vlm("qwen2_5_vl", n_layers=3)
    rl = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        rl.lm_head.weight.add_(torch.randn(rl.lm_head.weight.shape, generator=generator) * 0.5)
        rl.model.language_model.norm.weight.mul_(1.5)
    models = vlm_probe.load_set(IN=vlm_probe.load(base), RL=vlm_probe.load(rl, processor=base.processor))
    batch = models.prepare(["how many red circles ?"] * 2, [[base.image(i)] for i in range(2)])
    frame = logit_lens(models, batch, positions="last", transfer=True, progress=False).frame
    with torch.no_grad():
        out = rl(**batch.inputs, output_hidden_states=True)
        states = out.hidden_states[-1][:, -1]  # HF's last entry is already through RL's final norm
    acts = collect({"RL": models["RL"]}, batch, layers=[2], groups=("last",), progress=False)
    raw = acts[("RL", "layer_out", 2, "last")]
    with torch.no_grad():
        by_in = base.model.lm_head(base.model.model.language_model.norm(raw))
        final = out.logits[:, -1]
    assert torch.allclose(rl.model.language_model.norm(raw), states, atol=1e-5)
    expected = (F.log_softmax(final, -1).exp() * (F.log_softmax(final, -1) - F.log_softmax(by_in, -1))).sum(-1)
    got = frame[(frame.checkpoint == "RL") & (frame.readout == "IN") & (frame.layer == 2)].sort_values("sample")
    np.testing.assert_allclose(got["kl_to_final"].values, expected.numpy(), rtol=1e-4, atol=1e-6)
    assert (got["kl_to_final"] > 1e-3).all(), "IN's head reads RL's last states differently"
    own = frame[(frame.checkpoint == "RL") & (frame.readout == "RL") & (frame.layer == 2)]
    assert own["kl_to_final"].abs().max() < 1e-6
    assert (got["top_tokens"].str.split(" | ").str[0].tolist()
            == base.tokenizer.convert_ids_to_tokens(by_in.argmax(-1).tolist()))


def test_tuned_lens_improves_on_the_logit_lens_and_roundtrips(pair, tmp_path) -> None:
    models, batch, _ = pair
    vlm = models["IN"]
    acts = collect({"model": vlm}, batch[:4], groups=("all",), progress=False)
    lens = TunedLens.fit(vlm, acts, layers=[0, 1, 2], steps=60, lr=1e-2, progress=False)
    lens.save(tmp_path / "lens")
    back = TunedLens.load(tmp_path / "lens")
    states = acts[("model", "layer_out", 1, "all")]
    torch.testing.assert_close(back(1, states), lens(1, states))
    compared = compare_lenses(vlm, lens, batch[:4], positions="all").by_layer()
    logit = compared[compared.lens == "logit"].set_index("layer")["kl_to_final"]
    tuned = compared[compared.lens == "tuned"].set_index("layer")["kl_to_final"]
    assert (tuned < logit).all(), "the trained translators must fit their own training tokens better"


def test_drift_is_zero_for_a_model_with_itself_and_before_the_first_changed_layer(pair) -> None:
    models, batch, _ = pair
    same = representation_drift({"IN": models["IN"], "IN again": models["IN"]}, batch, progress=False).frame
    assert (same["rel_norm"] == 0).all() and (same["cosine"] == 1).all()
    assert np.allclose(same["cka"], 1)
    drift = representation_drift(models, batch, progress=False).frame
    before = drift[drift.layer < 2]
    after = drift[drift.layer >= 2]
    assert (before["rel_norm"] == 0).all() and (before["cosine"] == 1).all()
    assert (after["rel_norm"] > 1e-3).all()


def test_linear_cka_matches_a_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, generator=generator)
    y = x @ torch.randn(8, 6, generator=generator) + 0.1 * torch.randn(50, 6, generator=generator)
    xc, yc = (x - x.mean(0)).numpy().astype(float), (y - y.mean(0)).numpy().astype(float)
    hsic = lambda a, b: np.trace(a @ a.T @ b @ b.T)  # noqa: E731
    expected = hsic(xc, yc) / np.sqrt(hsic(xc, xc) * hsic(yc, yc))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-9)
    assert linear_cka(x, 3 * x) == pytest.approx(1.0)


def test_probe_finds_a_planted_property_from_its_layer_on() -> None:
    """Write a random label linearly into the residual stream at layer k (a hook): probes decode
    it from k on and not before; the shuffled-label control stays at chance."""
    tiny = tiny_vlm("qwen2_5_vl", n_layers=5)
    vlm = vlm_probe.load(tiny)
    n, k = 48, 2
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(1))
    direction = torch.randn(vlm.d_model, generator=torch.Generator().manual_seed(2))
    batch = vlm.prepare(["how many red circles ?"] * n, [[tiny.image(i)] for i in range(n)])
    current = {}

    def plant(module, args, kwargs):  # into the residual stream entering layer k
        rows = current["labels"].float() * 2 - 1
        return (args[0] + 3.0 * rows[:, None, None] * direction, *args[1:]), kwargs

    handle = vlm.layers[k].envoy._module.register_forward_pre_hook(plant, with_kwargs=True)
    try:
        acts = Activations()
        for start in range(0, n, 16):
            current["labels"] = labels[start : start + 16]
            part = collect({"m": vlm}, batch[start : start + 16], groups=("last",), progress=False)
            for key, tensor in part.tensors.items():
                acts.add(key, tensor, part.samples[key] + start, part.positions[key])
    finally:
        handle.remove()
    result = probe_layers(acts, labels, group="last", seeds=(0, 1))
    by_layer = result.by_layer().set_index("layer")
    assert (by_layer.loc[k:, "score"] > 0.95).all()
    assert (by_layer.loc[: k - 1, "score"] < 0.8).all()
    assert (by_layer["control"] < 0.8).all()
    assert (by_layer.loc[k:, "selectivity"] > 0.2).all()


def test_probe_transfer_and_direction_cosine(pair) -> None:
    models, batch, _ = pair
    labels = [i % 2 for i in range(len(batch))]
    acts = collect(models, batch, groups=("vision",), reduce="mean", progress=False)
    result = probe_layers(acts, labels, group="vision", seeds=(0,), control=False, test_size=0.34)
    scores = result.scores
    assert set(zip(scores["train"], scores["eval"])) == {("IN", "IN"), ("IN", "RL"), ("RL", "IN"), ("RL", "RL")}
    cos = result.cosines().set_index("layer")["cosine"]
    assert np.allclose(cos.loc[:1], 1.0, atol=1e-4), "identical layers give identical probe directions"


def test_collect_disk_cache_resumes_and_matches_memory(pair, tmp_path, monkeypatch) -> None:
    collect_module = importlib.import_module("vlm_probe.analyses.collect")  # the package exports collect()

    models, batch, _ = pair
    memory = collect(models, batch, groups=("vision", "last"), batch_size=2, progress=False)
    real, calls = collect_module._collect_batch, []

    def interrupted(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while collecting the third batch
        return real(*args, **kwargs)

    monkeypatch.setattr(collect_module, "_collect_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        collect(models, batch, groups=("vision", "last"), batch_size=2, progress=False, out=tmp_path / "cache")
    n_batches = -(-len(batch) // 2)
    written = json.loads((tmp_path / "cache" / "index.json").read_text())["shards"]
    assert len(written) == 2
    calls.clear()
    monkeypatch.setattr(collect_module, "_collect_batch", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    disk = collect(models, batch, groups=("vision", "last"), batch_size=2, progress=False, out=tmp_path / "cache")
    assert len(calls) == 2 * n_batches - 2, "the resumed run computes only the missing batches"
    assert not disk.tensors and disk.files, "a disk cache is opened lazily"
    eager = collect_module.Activations.load(tmp_path / "cache", lazy=False)
    index = (tmp_path / "cache" / "index.json").read_text()
    again = collect(models, batch, groups=("vision", "last"), batch_size=2, progress=False, out=tmp_path / "cache")
    assert (tmp_path / "cache" / "index.json").read_text() == index, "a finished cache is not rewritten"
    assert sorted(memory.keys()) == sorted(disk.keys()) == sorted(eager.keys())
    for key in memory.keys():
        assert torch.equal(memory[key], disk[key]) and torch.equal(memory[key], again[key])
        assert torch.equal(memory[key], eager[key])
        assert torch.equal(memory.sample_index(key), disk.sample_index(key))
        assert torch.equal(memory.position_index(key), disk.position_index(key))
    with pytest.raises(vlm_probe.errors.InputError, match="other settings"):
        collect(models, batch, groups=("last",), batch_size=2, progress=False, out=tmp_path / "cache")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mass_equals_eager_weights(family: str) -> None:
    tiny = tiny_vlm(family)
    vlm = vlm_probe.load(tiny, attn_implementation="sdpa")
    batch = vlm.prepare(["how many ?", "what color is it ?"], [[tiny.image(1)], [tiny.image(2)]])
    queries, keys = ("question", "vision") if vlm.spec.image_in_residual else ("last", "question")
    result = attention_mass(vlm, batch, queries=queries, keys=keys, progress=False)
    eager = vlm_probe.load(tiny_vlm(family), attn_implementation="eager")
    q, k = batch.layout.mask(queries).float(), batch.layout.mask(keys).float()
    for layer in range(vlm.n_layers):
        if vlm.layers[layer].is_cross_attention:
            continue
        with torch.no_grad(), eager.trace(batch):
            weights = eager.layers[layer].attn.output[1].save()
        expected = ((weights * k[:, None, None, :]).sum(-1) * q[:, None, :]).sum(-1) / q.sum(1)[:, None]
        got = result.frame[result.frame.layer == layer].sort_values(["sample", "head"])["mass"].values
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32).view(2, -1), expected, atol=1e-5, rtol=0)


def test_attention_mass_during_generation_equals_eager(pair) -> None:
    _, _, base = pair
    vlm = vlm_probe.load(base, attn_implementation="sdpa")
    batch = vlm.prepare(["how many red circles ?"] * 2, [[base.image(1)], [base.image(2)]])
    steps = 3
    result = attention_mass(vlm, batch, queries="generated", keys="vision", max_new_tokens=steps, progress=False)
    eager = vlm_probe.load(tiny_vlm("qwen2_5_vl", n_layers=5), attn_implementation="eager")
    from vlm_probe.analyses.generation import fixed_steps, greedy_config

    config = fixed_steps(greedy_config(eager, steps))
    vision = batch.layout.mask("vision").float()
    with torch.no_grad(), eager.generate(batch, generation_config=config) as tracer:
        weights = vlm_probe.model.wrapper.nnsight.save([])
        for _ in tracer.iter[1:steps]:
            weights.append([layer.attn.output[1] for layer in eager.layers])
    for layer in range(eager.n_layers):
        per_step = [(w[layer][:, :, 0, : vision.shape[1]] * vision[:, None, :]).sum(-1) for w in weights]
        expected = torch.stack(per_step).mean(0)
        got = result.frame[result.frame.layer == layer].sort_values(["sample", "head"])["mass"].values
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32).view(2, -1), expected, atol=1e-5, rtol=0)


def test_attention_mass_difference_between_checkpoints(pair) -> None:
    models, batch, _ = pair
    result = attention_mass(models, batch, queries="last", keys="vision", progress=False)
    diff = result.difference("IN", "RL").set_index("layer")
    assert (diff.loc[:1, "difference"].abs() < 1e-6).all(), "layers before the first changed one agree"
    assert (diff.loc[2:3, "difference"].abs() > 1e-5).all()
    assert result.plot() is not None


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_overlay_puts_each_value_in_its_tokens_cell(family: str, zoo) -> None:
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    image = tiny.image(3)
    row = vlm.prepare("what color ?", images=[image]).layout[0]
    values = np.arange(len(row.spans["vision"]), dtype=float)
    fig = overlay_figure(image, row, values, labels=[f"t{i}" for i in range(len(values))])
    heat = fig.data[1]
    grid = np.asarray(heat.z)
    for value, cell in zip(values, row.cells):
        assert grid[cell.row, cell.col] == value
    spec = row.tiles[(0, 0)]
    assert grid.shape == (spec.rows, spec.cols)
    width, height = image.size
    assert heat.x[0] == pytest.approx(width / spec.cols / 2) and heat.y[-1] == pytest.approx(height - height / spec.rows / 2)
    assert "t0" in heat.text[row.cells[0].row][row.cells[0].col]


def test_patching_and_attention_overlays(pair) -> None:
    models, batch, base = pair
    vlm = models["IN"]
    from vlm_probe.analyses import metrics as M
    from vlm_probe.analyses import sweep

    result = sweep(vlm, batch[:1], batch[1:2], layers=[0, 1], positions="each:vision", metric=M.kl_to_clean(),
                   progress=False)
    fig = result.overlay(batch[1:2], layer=0)
    grid, _, _ = cell_grid(batch.layout[1], [0.0] * len(batch.layout[1].spans["vision"]))
    assert np.asarray(fig.data[1].z).shape == grid.shape
    lens = logit_lens(vlm, batch[:1], positions="vision", progress=False)
    fig = lens.overlay(batch[:1], layer=1)
    assert np.isfinite(np.asarray(fig.data[1].z, dtype=float)).all()
    attention = token_attention(vlm, batch, queries="last")
    assert attention.shape == batch.inputs["input_ids"].shape
    torch.testing.assert_close(attention.sum(1), torch.ones(len(batch)), atol=1e-5, rtol=0)
    # per checkpoint on one colour range, and RL minus IN centred at 0
    values = {name: token_attention(m, batch, queries="last") for name, m in models.items()}
    figures = overlay_checkpoints(batch, values, sample=1)
    assert list(figures) == ["IN", "RL", "RL - IN"]
    row = batch.layout[1]
    for name in ("IN", "RL"):
        expected, _, _ = cell_grid(row, values[name][1, row.spans["vision"]].numpy())
        np.testing.assert_allclose(np.asarray(figures[name].data[1].z, dtype=float), expected, rtol=1e-6)
    assert figures["IN"].data[1].zmin == figures["RL"].data[1].zmin
    delta, _, _ = cell_grid(row, (values["RL"] - values["IN"])[1, row.spans["vision"]].numpy())
    np.testing.assert_allclose(np.asarray(figures["RL - IN"].data[1].z, dtype=float), delta, rtol=1e-5, atol=1e-7)
    assert figures["RL - IN"].data[1].zmid == 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_collect_reaches_vision_blocks_and_the_projector(family: str, zoo) -> None:
    """Vision-block and projector activations, one row per patch or image token with its
    sample, equal each sample's own activations read by plain torch hooks."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many ?", "what color is it ?", "how many ?"], [[tiny.image(i)] for i in range(3)])
    acts = collect(vlm, batch, sites=("vision_out", "projector"), layers=[-1], groups=("all",), progress=False)
    means = collect(vlm, batch, sites=("projector",), groups=("all",), reduce="mean", progress=False)
    last = vlm.vision.depth - 1
    for site, module in (("vision_out", vlm.vision.blocks[last]._module), ("projector", vlm.projector._module)):
        key = ("model", site, last if site == "vision_out" else 0, "all")
        for s in range(len(batch)):
            seen = {}
            handle = module.register_forward_hook(lambda m, a, o: seen.setdefault("out", o))
            try:
                with torch.no_grad():
                    vlm.hf(**batch[s].inputs)
            finally:
                handle.remove()
            expected = seen["out"].reshape(-1, seen["out"].shape[-1])
            rows = acts.sample_index(key) == s
            torch.testing.assert_close(acts[key][rows], expected, atol=1e-5, rtol=0)
            if site == "projector":
                torch.testing.assert_close(means[key][s], expected.mean(0), atol=1e-5, rtol=0)
