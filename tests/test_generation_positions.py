"""Absolute positions at every decode step, on Gemma3 with a prompt longer than its sliding
window (the cache of a sliding layer keeps only the last window - 1 keys, so key column j is
not position j): knockout and attention mass equal a hand-written, uncached reference.

The reference recomputes the whole sequence at every step without a cache, with the knockout
written into the full [T, T] mask the model builds (window included) by a plain torch
pre-hook, and reads eager attention weights at absolute columns.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import vlm_probe
from vlm_probe.analyses.attention_mass import attention_mass
from vlm_probe.analyses.generation import fixed_steps, greedy_config
from vlm_probe.analyses.ablation import knockout_sweep
from vlm_probe.interventions import Knockout
from vlm_probe.testbed.zoo import tiny_vlm

STEPS = 5
PROMPTS = ["is the big blue square left of the small red circle and above the green one ?",
           "how many red circles are there in this picture and what color is the big square ?"]


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def gemma(request):
    tiny = tiny_vlm("gemma3")  # a copy per attention implementation (load() switches the model's)
    vlm = vlm_probe.load(tiny, attn_implementation=request.param)
    batch = vlm.prepare(PROMPTS, [[tiny.image(1)], [tiny.image(2)]])
    window = vlm.text_config.sliding_window
    assert batch.width > window + 4, "the prompt must be longer than the sliding window"
    assert "sliding_attention" in vlm.text_config.layer_types
    return vlm, batch


@contextlib.contextmanager
def hooks(*handles):
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _generated_queries(batch, total: int) -> torch.Tensor:
    queries = torch.zeros(len(batch), total, dtype=torch.bool)
    for r, layout in enumerate(batch.layout):
        queries[r, layout.spans["last_prompt"][0] :] = True
    return queries


def _uncached_reference(vlm, batch, steps: int, layer: int | None, queries, keys):
    """Greedy decoding by full, uncached forwards; the knockout written into the mask of
    ``layer`` by a pre-hook (all columns absolute). Returns the generated ids and per-step logits."""
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    extra = {k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "position_ids",
                                                                 "token_type_ids")}
    suppressed = greedy_config(vlm, steps).suppress_tokens
    out, logits_per_step = [], []
    for step in range(steps):
        width = ids.shape[1]

        def pre(module, args, kwargs):
            base = kwargs["attention_mask"]  # [B, 1, T, T] additive or boolean, window included
            edited = base.clone()
            cut = False if base.dtype == torch.bool else torch.finfo(base.dtype).min
            for b in range(base.shape[0]):
                for q in range(width):
                    if not queries[b, q]:
                        continue
                    for k in range(width):
                        if k != q and keys[b, k]:
                            edited[b, :, q, k] = cut
            return args, dict(kwargs, attention_mask=edited)

        handles = [] if layer is None else [vlm.layers[layer].attn._module.register_forward_pre_hook(pre, with_kwargs=True)]
        token_types = torch.cat([batch.inputs["token_type_ids"],
                                 torch.zeros(len(batch), step, dtype=torch.long)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with hooks(*handles), torch.no_grad():
            logits = vlm.hf(input_ids=ids, attention_mask=mask, position_ids=positions, token_type_ids=token_types,
                            use_cache=False, **extra).logits[:, -1]
        logits_per_step.append(logits)
        logits = logits.clone()
        logits[:, suppressed] = float("-inf")
        token = logits.argmax(-1)
        out.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(len(batch), 1, dtype=mask.dtype)], dim=1)
    return torch.stack(out, dim=1), logits_per_step


@pytest.mark.parametrize("group", ["vision", "question"])
def test_knockout_during_generation_beyond_the_window_equals_uncached_reference(gemma, group: str) -> None:
    """Generated tokens -> vision keys (outside the window at decode steps: nothing to cut
    there) and -> question keys (inside it: the logits change)."""
    vlm, batch = gemma
    sliding = [i for i, t in enumerate(vlm.text_config.layer_types) if t == "sliding_attention"]
    layer = sliding[-1]
    total = batch.width + STEPS
    queries, keys = _generated_queries(batch, total), torch.zeros(len(batch), total, dtype=torch.bool)
    keys[:, : batch.width] = batch.layout.mask(group)
    expected_ids, expected_logits = _uncached_reference(vlm, batch, STEPS, layer, queries, keys)
    plain_ids, plain_logits = _uncached_reference(vlm, batch, STEPS, None, queries, keys)
    # inside a user's generation trace: the primitive at every step
    config = fixed_steps(greedy_config(vlm, STEPS))
    with torch.no_grad(), vlm.generate(batch, generation_config=config) as tracer:
        logits = vlm_probe.model.wrapper.nnsight.save([])
        for _ in tracer.iter[0:STEPS]:
            Knockout(layer, queries, keys).apply(vlm, batch)
            logits.append(vlm.lm_head.output[:, -1])
        ids = tracer.result.save()
    for step in range(STEPS):
        torch.testing.assert_close(logits[step], expected_logits[step], atol=1e-4, rtol=0)
    assert torch.equal(ids[:, batch.width :], expected_ids)
    if group == "question":
        effect = max(float((a - b).abs().max()) for a, b in zip(expected_logits[1:], plain_logits[1:]))
        assert effect > 1e-3, "cutting edges inside the window changes the decode-step logits"
    # the sweep (its own decode loop over the cache) gives the same answers
    frame = knockout_sweep(vlm, batch, ["x", "y"], queries="generated", keys=group, layers=[layer],
                           level="answer", max_new_tokens=STEPS, progress=False).frame
    answers = list(frame[frame.layer == layer].sort_values("sample")["answer"])
    expected = vlm_probe.analyses.generation.decode_rows(vlm.tokenizer, expected_ids.tolist(),
                                                         vlm_probe.analyses.generation.eos_ids(vlm))
    assert answers == [g.text for g in expected]


def test_attention_mass_of_generated_tokens_beyond_the_window_equals_uncached_eager(gemma) -> None:
    vlm, batch = gemma
    result = attention_mass(vlm, batch, queries="generated", keys="vision", max_new_tokens=STEPS, progress=False)
    generated, _ = _uncached_reference(vlm, batch, STEPS, None, None, None)
    ids = torch.cat([batch.inputs["input_ids"], generated[:, : STEPS - 1]], dim=1)
    mask = torch.cat([batch.inputs["attention_mask"], torch.ones(len(batch), STEPS - 1, dtype=torch.long)], dim=1)
    token_types = torch.cat([batch.inputs["token_type_ids"], torch.zeros(len(batch), STEPS - 1, dtype=torch.long)], 1)
    extra = {k: v for k, v in batch.inputs.items() if k in ("pixel_values",)}
    with torch.no_grad():
        out = vlm.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                     token_type_ids=token_types, output_attentions=True, use_cache=False, **extra)
    if not out.attentions or out.attentions[0] is None:  # sdpa returns no weights: read them from an eager copy
        eager = vlm_probe.load(tiny_vlm("gemma3"), attn_implementation="eager")
        with torch.no_grad():
            out = eager.hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           token_type_ids=token_types, output_attentions=True, use_cache=False, **extra)
    vision = batch.layout.mask("vision").float()
    rows = range(batch.width, batch.width + STEPS - 1)  # the queries of decode steps 1..STEPS-1
    for layer, weights in enumerate(out.attentions):
        expected = torch.stack([(weights[:, :, q, : batch.width] * vision[:, None, :]).sum(-1) for q in rows]).mean(0)
        got = result.frame[result.frame.layer == layer].sort_values(["sample", "head"])["mass"].values
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float32).view(len(batch), -1), expected,
                                   atol=1e-5, rtol=0)
