"""Intervention primitives against golden references: the same intervention applied by hand
with plain torch hooks (no nnsight) on the HF model, on three families."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlm_probe
from vlm_probe.analyses.generation import decode_new, greedy_config
from vlm_probe.analyses.swap import vision_swap_sweep
from vlm_probe.errors import InputError, InterventionError, NoOpInterventionError
from vlm_probe.interventions import ablate, knockout, patch, skip_layer, vision_kv
from vlm_probe.testbed.zoo import tiny_vlm

GOLDEN_FAMILIES = ("qwen2_5_vl", "llava", "idefics3")


@contextlib.contextmanager
def hooks(*handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _setup(family: str, attn: str = "sdpa"):
    tiny = tiny_vlm(family)
    vlm = vlm_probe.load(tiny, attn_implementation=attn)
    batch = vlm.prepare(["how many red circles ?"] * 2, [[tiny.image(1)], [tiny.image(2)]])
    return vlm, tiny, batch


def _decoder(vlm, layer):
    return vlm.layers[layer].envoy._module


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
def test_patch_matches_hooked_forward(family: str) -> None:
    vlm, tiny, batch = _setup(family)
    clean, corrupt = batch[0], batch[1]
    with torch.no_grad():
        clean_hidden = vlm.hf(**clean.inputs, output_hidden_states=True).hidden_states[3]  # layer 2 output
    mask = corrupt.layout.mask("vision")

    def replace(module, args, output):
        out = output.clone()
        out[mask] = clean_hidden[mask]
        return out

    with hooks(_decoder(vlm, 2).register_forward_hook(replace)), torch.no_grad():
        reference = vlm.hf(**corrupt.inputs).logits
    with torch.no_grad(), vlm.trace(corrupt):
        patch(vlm, corrupt, "layer_out", 2, "vision", clean_hidden)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, reference, atol=1e-6, rtol=0)
    with torch.no_grad():
        unpatched = vlm.hf(**corrupt.inputs).logits
    assert (logits - unpatched).abs().max() > 1e-4


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablate_matches_hooked_forward(family: str, mode: str) -> None:
    vlm, tiny, batch = _setup(family)
    mask = batch.layout.mask("question")
    with torch.no_grad():
        states = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states[2]  # layer 1 output
    reference_rows = states[batch.layout.mask("vision")]
    reference = {"zero": None, "mean": reference_rows.mean(0), "resample": reference_rows}[mode]
    n = int(mask.sum())
    if mode == "zero":
        values = torch.zeros(n, vlm.d_model)
    elif mode == "mean":
        values = reference.expand(n, -1)
    else:
        draws = torch.randint(0, reference.shape[0], (n,), generator=torch.Generator().manual_seed(7))
        values = reference[draws]

    def replace(module, args, output):
        out = output.clone()
        out[mask] = values
        return out

    with hooks(_decoder(vlm, 1).register_forward_hook(replace)), torch.no_grad():
        expected = vlm.hf(**batch.inputs).logits
    with torch.no_grad(), vlm.trace(batch):
        ablate(vlm, batch, "layer_out", 1, "question", mode=mode, reference=reference, seed=7)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
def test_skip_layer_matches_identity_hook_also_in_generation(family: str) -> None:
    vlm, tiny, batch = _setup(family)
    identity = lambda module, args, output: args[0]  # noqa: E731
    config = greedy_config(vlm, max_new_tokens=4)
    with hooks(_decoder(vlm, 2).register_forward_hook(identity)), torch.no_grad():
        expected = vlm.hf(**batch.inputs).logits
        expected_ids = vlm.hf.generate(**{k: v for k, v in batch.inputs.items() if k != "position_ids"},
                                       generation_config=config)
    with torch.no_grad(), vlm.trace(batch):
        skip_layer(vlm, 2)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    with torch.no_grad(), vlm.generate(batch, generation_config=config) as tracer:
        for _ in tracer.iter[0:4]:
            skip_layer(vlm, 2)
        ids = tracer.result.save()
    assert torch.equal(ids[:, : expected_ids.shape[1]], expected_ids)


def _reference_knockout_mask(mask, n_q, n_k, queries, keys, heads, n_heads):
    """An explicit, loop-built knockout of an additive/boolean mask (independent of the toolkit)."""
    batch = queries.shape[0]
    if mask is None:
        mask = torch.ones(batch, 1, n_q, n_k, dtype=torch.bool)
        for i in range(n_q):
            mask[:, :, i, n_k - n_q + i + 1 :] = False
    out = mask.expand(batch, n_heads, n_q, n_k).clone()
    for b in range(batch):
        for i in range(n_q):
            q = n_k - n_q + i
            if q >= queries.shape[1] or not queries[b, q]:
                continue
            for k in range(n_k):
                if k != q and k < keys.shape[1] and keys[b, k]:
                    for h in heads if heads is not None else range(n_heads):
                        out[b, h, i, k] = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
    return out


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_knockout_matches_explicit_mask(family: str, attn: str) -> None:
    vlm, tiny, batch = _setup(family, attn)
    queries, keys, heads = batch.layout.mask("last"), batch.layout.mask("vision"), [1, 3]
    attention = vlm.layers[1].attn._module

    def pre(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        mask = kwargs.get("attention_mask")
        n_q = hidden.shape[1]
        n_k = mask.shape[-1] if mask is not None else n_q
        kwargs = dict(kwargs, attention_mask=_reference_knockout_mask(mask, n_q, n_k, queries, keys, heads, vlm.n_heads))
        return args, kwargs

    with hooks(attention.register_forward_pre_hook(pre, with_kwargs=True)), torch.no_grad():
        expected = vlm.hf(**batch.inputs).logits
    with torch.no_grad(), vlm.trace(batch):
        knockout(vlm, 1, queries, keys, heads=heads)
        logits = vlm.lm_head.output.save()
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], expected[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = vlm.hf(**batch.inputs).logits
    assert (logits[valid] - plain[valid]).abs().max() > 1e-5


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
def test_knockout_same_under_eager_and_sdpa_and_renormalizes(family: str) -> None:
    results = {}
    for attn in ("eager", "sdpa"):
        vlm, tiny, batch = _setup(family, attn)
        q, k = batch.layout.mask("last"), batch.layout.mask("vision")
        with torch.no_grad(), vlm.trace(batch):
            knockout(vlm, 1, q, k)
            weights = vlm.layers[1].attn.output[1].save() if attn == "eager" else None
            results[attn] = vlm.lm_head.output.save()
        if attn == "eager":
            with torch.no_grad(), vlm.trace(batch):
                plain_weights = vlm.layers[1].attn.output[1].save()
            last = batch.width - 1
            for row in range(2):
                vision = k[row]
                assert weights[row, :, last, vision].abs().max() == 0
                expected = plain_weights[row, :, last].clone()
                expected[:, vision] = 0
                expected = expected / expected.sum(-1, keepdim=True)
                torch.testing.assert_close(weights[row, :, last], expected, atol=1e-6, rtol=0)
                torch.testing.assert_close(weights[row, :, :last], plain_weights[row, :, :last])
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(results["eager"][valid], results["sdpa"][valid], atol=1e-5, rtol=0)


def test_knockout_during_generation_matches_hooked_generate() -> None:
    vlm, tiny, batch = _setup("qwen2_5_vl", "eager")
    config = greedy_config(vlm, max_new_tokens=4)
    total = batch.width + 4
    queries = torch.zeros(2, total, dtype=torch.bool)
    queries[:, batch.width - 1 :] = True
    keys = torch.zeros(2, total, dtype=torch.bool)
    keys[:, : batch.width] = batch.layout.mask("vision")
    handles = []
    for layer in range(vlm.n_layers):
        def pre(module, args, kwargs):
            mask = kwargs.get("attention_mask")
            n_q = kwargs["hidden_states"].shape[1]
            n_k = mask.shape[-1]
            return args, dict(kwargs, attention_mask=_reference_knockout_mask(mask, n_q, n_k, queries, keys, None, vlm.n_heads))
        handles.append(vlm.layers[layer].attn._module.register_forward_pre_hook(pre, with_kwargs=True))
    inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}
    with hooks(*handles), torch.no_grad():
        expected = vlm.hf.generate(**inputs, generation_config=config)
    with torch.no_grad(), vlm.generate(batch, generation_config=config) as tracer:
        for _ in tracer.iter[0:4]:
            for layer in range(vlm.n_layers):
                knockout(vlm, layer, queries, keys)
        ids = tracer.result.save()
    assert torch.equal(ids[:, : expected.shape[1]], expected)
    with torch.no_grad():
        plain = vlm.hf.generate(**inputs, generation_config=config)
    assert not torch.equal(plain, expected), "knocking out vision should change this tiny model's answer"


@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
def test_knockout_of_empty_edge_set_changes_nothing(family: str) -> None:
    vlm, tiny, batch = _setup(family)
    none = torch.zeros_like(batch.layout.mask("vision"))
    with torch.no_grad(), vlm.trace(batch):
        for layer in range(vlm.n_layers):
            knockout(vlm, layer, none, batch.layout.mask("vision"))
        logits = vlm.lm_head.output.save()
    with torch.no_grad():
        plain = vlm.hf(**batch.inputs).logits
    valid = batch.inputs["attention_mask"].bool()
    torch.testing.assert_close(logits[valid], plain[valid], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["from", "only"])
@pytest.mark.parametrize("family", GOLDEN_FAMILIES)
def test_vision_kv_swap_matches_hooked_prefill_swap(family: str, mode: str) -> None:
    vlm, tiny, batch = _setup(family)
    targets = vlm.prepare(["how many red circles ?"] * 2, [[tiny.image(1)], [tiny.image(2)]])
    sources = vlm.prepare(["how many red circles ?"] * 2, [[tiny.image(3)], [tiny.image(4)]])
    start = 1
    layers = range(start, vlm.n_layers) if mode == "from" else range(start, start + 1)
    kv = vision_kv(vlm, sources, layers)
    # reference: hooks on k/v projections that fire on the first (prefill) call only
    mask = targets.layout.mask("vision")
    handles, calls = [], {}
    for layer in layers:
        for name, value in zip(("k", "v"), kv[layer]):
            module = getattr(vlm.layers[layer], name)._module

            def hook(module, args, output, value=value, key=(layer, name)):
                calls[key] = calls.get(key, 0) + 1
                if calls[key] > 1:
                    return output
                out = output.clone()
                out[mask] = value
                return out

            handles.append(module.register_forward_hook(hook))
    config = greedy_config(vlm, max_new_tokens=4)
    inputs = {k: v for k, v in targets.inputs.items() if k != "position_ids"}
    with hooks(*handles), torch.no_grad():
        expected = decode_new(vlm, vlm.hf.generate(**inputs, generation_config=config), targets.width)
    result = vision_swap_sweep(vlm, targets, sources, layers=[start], mode=mode, progress=False,
                               generation_config=config)
    assert list(result.frame["answer"]) == expected
    assert all(count > 1 for count in calls.values()), "decode steps ran without re-applying the swap"


def test_swap_refuses_mismatched_vision_spans(qwen, zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    targets = qwen.prepare("how many ?", images=[tiny.image(1)])
    sources = qwen.prepare("how many ?", images=[tiny.image(2, size=(48, 48))])
    with pytest.raises(InputError, match="same number of tokens"):
        vision_swap_sweep(qwen, targets, sources, layers=[0], progress=False)
    with pytest.raises(InputError, match="source_grader"):
        vision_swap_sweep(qwen, targets, targets, layers=[0], grader=[lambda answer: True], progress=False)


def test_mllama_refuses_image_position_interventions(zoo) -> None:
    vlm = vlm_probe.load(zoo("mllama"))
    batch = vlm.prepare("how many ?", images=[zoo("mllama").image()])
    with pytest.raises(NoOpInterventionError, match="cross-attention"):
        vision_kv(vlm, batch, [0])
    with pytest.raises(InterventionError, match="cross-attention layer"):
        with vlm.trace(batch):
            knockout(vlm, 1, batch.layout.mask("last"), batch.layout.mask("text"))
