"""The tracing layer against golden forward passes, for every family and attention backend."""

from __future__ import annotations

import gc
import sys
import weakref

import nnsight
import pytest
import torch

import vlm_probe
from vlm_probe.testbed.zoo import FAMILIES, tiny_vlm

BACKENDS = ("eager", "sdpa")


def _wrap(family: str, attn: str, seed: int = 0) -> tuple[vlm_probe.VLM, object]:
    tiny = tiny_vlm(family, seed=seed)
    return vlm_probe.load(tiny, attn_implementation=attn), tiny


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_trace_reproduces_plain_forward(family: str, attn: str) -> None:
    vlm, tiny = _wrap(family, attn)
    batch = vlm.prepare(
        ["how many red circles ?", "what color is the square ?"], [[tiny.image(1)], [tiny.image(2)]]
    )
    with torch.no_grad():
        plain = vlm.hf(**batch.inputs, output_hidden_states=True)
    with vlm.trace(batch):
        outputs = nnsight.save([layer.output for layer in vlm.layers])
        logits = vlm.lm_head.output.save()
    assert torch.equal(logits, plain.logits), "a trace with no intervention must not change the logits"
    for i in range(vlm.n_layers - 1):  # the last hidden state has the final norm applied
        assert torch.equal(outputs[i], plain.hidden_states[i + 1]), f"layer {i} output != hidden_states[{i + 1}]"
    # changing the image changes the logits
    other = vlm.prepare(
        ["how many red circles ?", "what color is the square ?"], [[tiny.image(3)], [tiny.image(4)]]
    )
    with torch.no_grad():
        changed = vlm.hf(**other.inputs).logits
    assert (changed - plain.logits).abs().max() > 1e-4, "the image has no effect on the logits"


@pytest.mark.parametrize("attn", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_two_invokes_equal_two_runs(family: str, attn: str) -> None:
    vlm, tiny = _wrap(family, attn)
    a = vlm.prepare("how many red circles ?", images=[tiny.image(1)])
    b = vlm.prepare("how many red circles ?", images=[tiny.image(2)])
    with vlm.trace() as tracer:
        with tracer.invoke(a):
            ha = vlm.layers[1].output.save()
            la = vlm.lm_head.output.save()
        with tracer.invoke(b):
            lb = vlm.lm_head.output.save()
    with torch.no_grad():
        ra = vlm.hf(**a.inputs, output_hidden_states=True)
        rb = vlm.hf(**b.inputs).logits
    assert la.shape == ra.logits.shape and lb.shape == rb.shape
    torch.testing.assert_close(la, ra.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(lb, rb, atol=1e-5, rtol=0)
    torch.testing.assert_close(ha, ra.hidden_states[2], atol=1e-5, rtol=0)
    assert (la - lb).abs().max() > 1e-4


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "mllama"])
def test_padded_rows_compute_what_they_compute_alone(family: str, zoo) -> None:
    """Left padding plus mask-derived positions: a padded row equals the row run alone."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(
        ["how many ?", "what color is the big square on the left ?"], [[tiny.image(1)], [tiny.image(2)]]
    )
    assert batch.layout[0].spans["pad"], "the short row should be padded"
    with torch.no_grad():
        together = vlm.hf(**batch.inputs).logits
        for i in range(2):
            alone = vlm.hf(**batch[i].inputs).logits[0]
            torch.testing.assert_close(together[i, -alone.shape[0] :], alone, atol=1e-5, rtol=0)


def test_generate_with_intervention_changes_tokens(zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare("how many red circles ?", images=[tiny.image(1)])
    with vlm.generate(batch, max_new_tokens=4, do_sample=False) as tracer:
        plain = tracer.result.save()
    with vlm.generate(batch, max_new_tokens=4, do_sample=False) as tracer:
        for _ in tracer.iter[0:4]:
            vlm.layers[1].output = vlm.layers[1].output * 0
        edited = tracer.result.save()
    reference = vlm.hf.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(plain, reference)
    assert not torch.equal(plain, edited)


def test_native_module_tree_reachable(qwen) -> None:
    batch = qwen.prepare("how many ?", images=[tiny_vlm("qwen2_5_vl").image()])
    with qwen.trace(batch):
        native = qwen.model.language_model.layers[2].output.save()
        standard = qwen.layers[2].output.save()
    assert torch.equal(native, standard)
    assert qwen.layers[2].envoy is qwen.model.language_model.layers[2]


def test_forward_inputs_go_to_the_model_untouched(qwen) -> None:
    from vlm_probe.errors import InputError
    from vlm_probe.model.inputs import ForwardInputs

    batch = qwen.prepare(["how many ?", "how many red circles ?"],
                         images=[[tiny_vlm("qwen2_5_vl").image(i)] for i in range(2)])
    with torch.no_grad():
        expected = qwen.hf(**batch.inputs).logits
    with torch.no_grad(), qwen.trace(ForwardInputs(dict(batch.inputs), rows=2)):
        row = qwen.layers[0].output.save()
        logits = qwen.lm_head.output.save()
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    assert row.shape[0] == 2
    with pytest.raises(InputError, match="one invoke"):
        with qwen.trace() as tracer:
            for _ in range(2):
                with tracer.invoke(ForwardInputs(dict(batch.inputs), rows=2)):
                    pass


def test_standard_sites_and_dimensions(family: str, zoo) -> None:
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    assert vlm.n_layers == tiny.sizes.n_layers
    assert vlm.d_model == tiny.sizes.d_model
    assert vlm.n_heads == tiny.sizes.n_heads
    assert vlm.image_token_id == tiny.model.config.image_token_id
    assert vlm.vision.depth >= tiny.sizes.vision_layers
    batch = vlm.prepare("what color ?", images=[tiny.image()])
    with vlm.trace(batch):  # reads follow execution order; the vision tower is traced apart
        emb = vlm.embed.output.save()
        attn_in = vlm.layers[0].input.save()
        q = vlm.layers[0].q.output.save()
        normed = vlm.final_norm.output.save()
    with vlm.trace(batch):
        block = vlm.vision.blocks[-1].output.save()
        proj = vlm.projector.output.save()
    assert emb.shape[:2] == batch.inputs["input_ids"].shape
    assert emb.shape[-1] == vlm.d_model
    assert q.shape[-1] % vlm.head_dim == 0
    assert attn_in.shape == emb.shape
    assert normed.shape[-1] == vlm.d_model
    assert block is not None and proj is not None


def test_no_leaks_after_trace_or_error(qwen) -> None:
    model = qwen.hf

    def state():
        return [
            (name, len(m._forward_hooks), len(m._forward_pre_hooks), id(m.__dict__.get("forward")))
            for name, m in model.named_modules()
        ]

    batch = qwen.prepare("how many ?", images=[tiny_vlm("qwen2_5_vl").image()])
    before = state()
    with qwen.trace(batch):
        kept = qwen.layers[1].output.save()
    assert state() == before
    with pytest.raises(RuntimeError, match="boom"):
        with qwen.trace(batch):
            qwen.layers[1].output = qwen.layers[1].output * 0
            raise RuntimeError("boom")
    assert state() == before
    assert not qwen.interleaver.mediators, "a worker outlived its trace"
    with torch.no_grad():
        reference = model(**batch.inputs).logits
    with qwen.trace(batch):
        after = qwen.lm_head.output.save()
    assert torch.equal(after, reference), "a raised trace left an edit behind"
    ref = weakref.ref(kept)
    del kept
    # nnsight writes saved values into the caller's frame; CPython < 3.13 keeps a cached
    # snapshot of a function's locals until they are read again, so refresh it.
    sys._getframe().f_locals
    gc.collect()
    assert ref() is None, "a saved tensor is kept alive after the user dropped it"
