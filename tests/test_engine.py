"""The variant engine: its greedy decoding equals ``generate`` on every family, every reuse path
equals plain runs, results record variants that re-run to the same numbers, and the options,
metrics and labels it relies on."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch

import vlm_probe
from vlm_probe.analyses import RunOptions, layer_increments, sweep
from vlm_probe.analyses import metrics as M
from vlm_probe.analyses.engine import AnswerLogprob, Greedy, Logits, Source, Variant, rerun, run
from vlm_probe.analyses.generation import GreedyGenerator, eos_ids, fixed_steps, generation_defaults, greedy_config
from vlm_probe.interventions import (KINDS, Ablate, Add, Intervention, Knockout, Patch, Skip, SwapKV, positions_label,
                                     variant_from_json, variant_json)
from vlm_probe.testbed.zoo import FAMILIES

PROMPTS = ["how many red circles ?", "is the big blue square left of the small circle ?"]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_greedy_decoding_equals_generate(zoo, family: str) -> None:
    """The engine's decode loop (position ids, masks, caches, text fields per step) gives
    ``generate``'s answers on every family, from a full prefill and from a suffix rerun."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(PROMPTS, [[tiny.image(1)], [tiny.image(2)]])
    config = greedy_config(vlm, 6)
    expected = [g.text for g in GreedyGenerator(vlm, config=config)(batch)]
    readout = Greedy(config, frozenset(eos_ids(vlm, config)))
    for reuse in (True, False):
        out = run(vlm, batch, [Variant(()), Variant((Skip(0),))], readout,
                  options=RunOptions(reuse=reuse, progress=False))
        assert [g.text for g in out.outputs[0]] == expected, f"reuse={reuse}"
    steps = fixed_steps(config)
    with torch.no_grad(), generation_defaults(vlm.hf, steps), vlm.generate(batch, generation_config=steps) as tracer:
        for _ in tracer.iter[0:6]:
            vlm_probe.interventions.skip_layer(vlm, 0)
        ids = tracer.result.save()
    skipped = vlm_probe.analyses.generation.decode_new(vlm, ids, batch.width, eos_ids(vlm, config))
    assert [g.text for g in out.outputs[1]] == skipped


def test_greedy_readout_refuses_sampling(qwen) -> None:
    config = greedy_config(qwen, 4, do_sample=True, temperature=0.7)
    with pytest.raises(vlm_probe.errors.InputError, match="do_sample"):
        Greedy(config)


@pytest.fixture(scope="module")
def pair(zoo):
    tiny = zoo("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(PROMPTS * 2, [[tiny.image(i)] for i in range(4)], answers=["3", "blue", "4", "red"])
    return vlm, tiny, batch[:2], batch[2:]


def test_every_reuse_path_equals_plain_runs(pair) -> None:
    """Mixed variants (prompt, decode-step and vision-tower interventions) with each readout:
    vision replay, replay below the shallowest edit and suffix reruns change no number."""
    vlm, _, clean, corrupt = pair
    variants = [
        [],
        [Patch("layer_out", 2, "question", source="clean")],
        [Patch("vision_out", 0, "all", source="clean")],
        [Skip(1), Knockout(3, "generated", "vision")],
        [Add("mlp_out", 2, "last", vector=tuple([0.5] * vlm.d_model))],
        [Ablate("attn_out", -1, "answer", mode="zero")],
        [Patch("projector", positions="all", source="clean"), Patch("final_norm", positions="last", source="clean")],
    ]
    sources = {"clean": Source(vlm, clean)}
    config = greedy_config(vlm, 4)
    for readout in (Logits("last_prompt"), AnswerLogprob(), Greedy(config, frozenset(eos_ids(vlm, config)))):
        fast = run(vlm, corrupt, variants, readout, sources=sources, options=RunOptions(max_rows=6, progress=False))
        slow = run(vlm, corrupt, variants, readout, sources=sources,
                   options=RunOptions(max_rows=2, reuse=False, progress=False))
        for a, b in zip(fast.outputs, slow.outputs):
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
            else:
                assert [g.text for g in a] == [g.text for g in b]
        assert fast.forwards <= slow.forwards


def test_interventions_round_trip_through_json() -> None:
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 3] = mask[1, 5] = True
    examples = [Patch("layer_out", -1, "vision", source="clean"), Patch("q", 2, mask), Patch("vision_out", 1),
                Ablate("mlp_out", 3, [1, 2], mode="resample", seed=4), Add("layer_in", 0, "generated", (1.0, -2.0),
                                                                             scale=0.5, every_step=True),
                Skip(2), Skip(0, "vision_out"), Knockout(1, mask, "vision", heads=(0, 2)), SwapKV(range(2, 4))]
    assert {type(e).kind for e in examples} == set(KINDS)
    for example in examples:
        back = Intervention.from_dict(example.to_dict())
        assert back == example and type(back) is type(example)
    assert variant_from_json(variant_json(examples)) == examples
    assert repr(Patch("layer_out", 1)) .startswith("Patch(")


def test_a_result_records_variants_that_rerun_to_its_numbers(pair) -> None:
    vlm, _, clean, corrupt = pair
    metric = M.logit_diff(vlm.tokenizer, ["3", "4"], ["5", "6"], 2)
    result = sweep(vlm, clean, corrupt, site=["layer_out", "q"], layers=[1, 3], positions=["vision", "question"],
                   metric=metric, progress=False)
    row = result.frame.iloc[5]
    logits = rerun(vlm, corrupt, row["variant"], Logits(metric.position), sources={"source": Source(vlm, clean)})
    value = M.score(metric, logits, logits, logits, torch.arange(2))[int(row["sample"])]
    assert abs(float(value) - row["value"]) < 1e-5


def test_old_keywords_map_onto_the_options_object(pair) -> None:
    vlm, _, clean, corrupt = pair
    a = sweep(vlm, clean, corrupt, layers=[0], max_rows=2, reuse_vision=False, progress=False).frame
    b = sweep(vlm, clean, corrupt, layers=[0], options=RunOptions(max_rows=2, reuse=False, progress=False)).frame
    pd.testing.assert_frame_equal(a, b)
    assert RunOptions.resolve(RunOptions(max_rows=8), {"progress": False}, "x") == RunOptions(max_rows=8, progress=False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_row'"):
        sweep(vlm, clean, corrupt, max_row=3)


def test_metrics_score_rows_by_their_sample_ids() -> None:
    metric = M.LogitDiff(torch.tensor([0, 1, 2]), torch.tensor([3, 3, 3]))
    logits = torch.arange(12.0).view(1, 12).repeat(4, 1)
    rows = torch.tensor([2, 0, 2, 1])  # any subset of the samples, in any order, repeated
    assert metric(logits, logits, logits, samples=rows).tolist() == [-1.0, -3.0, -1.0, -2.0]
    with pytest.raises(vlm_probe.errors.InputError, match="sample ids"):
        metric(logits, logits, logits)  # 4 rows for 3 per-sample targets and no ids


def test_different_masks_get_different_labels_and_increments_warn(pair) -> None:
    vlm, _, clean, corrupt = pair
    a, b = torch.zeros(2, corrupt.width, dtype=torch.bool), torch.zeros(2, corrupt.width, dtype=torch.bool)
    a[:, -1], b[:, -2] = True, True
    assert positions_label(a) != positions_label(b) and positions_label(a) == positions_label(a.clone())
    result = sweep(vlm, clean, corrupt, layers=[0, 1], positions=[a, b], metric=M.kl_to_clean(), progress=False)
    assert result.summary()["positions"].nunique() == 2
    with pytest.warns(UserWarning, match="not a cumulative effect"):
        layer_increments(result)
    cumulative = sweep(vlm, clean, corrupt, layers=[0, 1], positions="all", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer_increments(cumulative)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_registered_site_reads_in_registry_order_on_every_family(zoo, family: str) -> None:
    """One invoke reading every site of the registry in its execution order never runs past
    one (embeddings run before the vision tower in most families, after it in Mllama), and a
    skipped vision block equals a torch hook returning the block's input."""
    from vlm_probe.interventions import sites as S

    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(PROMPTS, [[tiny.image(1)], [tiny.image(2)]])
    pairs = [(name, index) for name in S.SITES for index in S.indices(vlm, name)]
    pairs.sort(key=lambda p: S.order(vlm, *p))
    with torch.no_grad(), vlm.trace(batch):
        values = vlm_probe.model.wrapper.nnsight.save([S.read(vlm, name, index) for name, index in pairs])
    for (name, index), value in zip(pairs, values):
        assert isinstance(value, torch.Tensor) and value.dim() >= 2, name
        cross = S.site(name).stage == "decoder" and vlm.layers[index].is_cross_attention and name in ("k", "v")
        if S.site(name).tokens and not cross:  # a cross-attention layer's keys and values run over the image
            assert value.shape[:2] == (len(batch), batch.width), name
    assert (S.order(vlm, "embed") > S.order(vlm, "vision_out", 0)) == (family == "mllama")
    block = vlm.vision.blocks[0]._module
    handle = block.register_forward_hook(
        lambda m, args, kwargs, out: (args or tuple(kwargs.values()))[0] if not isinstance(out, tuple)
        else ((args or tuple(kwargs.values()))[0], *out[1:]), with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            expected = vlm.hf(**batch.inputs).logits
    finally:
        handle.remove()
    with torch.no_grad(), vlm.trace(batch):
        Skip(0, "vision_out").apply(vlm, batch)
        logits = vlm.lm_head.output.save()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
