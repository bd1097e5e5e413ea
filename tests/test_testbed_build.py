"""Testbed training on the reduced recipe: determinism, caching, checkpoints, freezing, decoding.

Oracles: a second build must give bit-identical tensors; the shared-prefix decoder must agree
with HF ``generate`` and with a plain full-sequence forward; frozen tensors must be
bit-identical to IN after RL while every other tensor moves; region membership is checked
against the layer index written in each parameter's name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import vlm_probe
from transformers import AutoModelForImageTextToText
from vlm_probe.errors import CheckpointError, MergePlanError
from vlm_probe.commands import testbed as commands
from vlm_probe.testbed.build import build_rl_variant, build_testbed, cache_root, build_dir
from vlm_probe.testbed.decoding import complete, completion_logits, decode_responses
from vlm_probe.testbed.encoding import Encoder
from vlm_probe.arch.regions import Cuts, locate_parameters, region_of
from vlm_probe.testbed.freezing import frozen, frozen_names
from vlm_probe.testbed.recipe import Recipe
from vlm_probe.testbed.rl import completion_mask, group_advantages, grpo
from vlm_probe.testbed.tasks import FAMILIES, ItemStream


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def hf_names(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("testbed-cache")


@pytest.fixture(scope="module")
def testbed(cache):
    return build_testbed(reduced=True, quiet=True, cache_dir=cache)


@pytest.fixture(scope="module")
def qwen_testbed(cache):
    """The second family, built by the same recipe code."""
    return build_testbed(Recipe.reduced_size(family="qwen2_5_vl"), quiet=True, cache_dir=cache, variants=())


@pytest.fixture(scope="module")
def in_model(testbed):
    from transformers import AutoModelForImageTextToText

    from vlm_probe.model.processors import load_processor

    path = testbed.checkpoint("IN")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = load_processor(path)
    return model, processor, Encoder(model, processor, vlm_probe.arch.get_spec(model.config))


@pytest.mark.parametrize("which", ["testbed", "qwen_testbed"])
def test_same_seed_same_weights(which, request, tmp_path) -> None:
    testbed = request.getfixturevalue(which)
    again = build_testbed(testbed.recipe, quiet=True, cache_dir=tmp_path, variants=())
    assert again.path.name == testbed.path.name
    for stage in ("Base", "IN", "RL"):
        a, b = tensors(testbed.checkpoint(stage)), tensors(again.checkpoint(stage))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage
    assert (again.data / "swap.jsonl").read_bytes() == (testbed.data / "swap.jsonl").read_bytes()
    other = build_testbed(testbed.recipe.replace(seed=1), quiet=True, cache_dir=tmp_path, variants=())
    a, b = tensors(testbed.checkpoint("Base")), tensors(other.checkpoint("Base"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_cache_is_reused_and_keyed_by_recipe(testbed, cache, capsys) -> None:
    stamp = (testbed.path / "build.json").stat().st_mtime_ns
    again = build_testbed(reduced=True, cache_dir=cache)
    assert again.path == testbed.path and (testbed.path / "build.json").stat().st_mtime_ns == stamp
    assert "using the cached build" in capsys.readouterr().out
    changed = Recipe.reduced_size().with_rl(kl=0.2)
    assert build_dir(changed, cache) != testbed.path
    assert not [p for p in (cache / "testbed").iterdir() if p.name.startswith(".")]  # no leftovers


def test_cache_root_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VLM_PROBE_CACHE", str(tmp_path / "a"))
    assert cache_root() == tmp_path / "a"
    monkeypatch.delenv("VLM_PROBE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "vlm_probe"


def test_checkpoints_are_ordinary_hf_directories(testbed) -> None:
    for stage in ("Base", "IN", "RL"):
        path = testbed.checkpoint(stage)
        assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    pair = testbed.load_set("IN", "RL")
    vlm = pair["RL"]
    assert vlm.family == "llava" and vlm.n_layers == Recipe.reduced_size().model_sizes.n_layers
    item = testbed.held_out()[0]
    batch = vlm.prepare(item.question, images=[item.picture()])
    with vlm.trace(batch):
        logits = vlm.lm_head.output.save()
    assert logits.shape[-1] == vlm.vocab_size
    encoder = Encoder(vlm.hf, vlm.processor, vlm.spec)
    assert encoder.stop_id in vlm.hf.generation_config.eos_token_id  # plain generate() stops at the end of the turn
    out = vlm.hf.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= batch.width + 4
    info = testbed.info
    assert set(info["accuracy"]) == {"Base", "IN", "RL"} and info["times"]["total"]["wall_s"] > 0
    assert json.loads((testbed.path / "recipe.json").read_text()) == testbed.recipe.to_dict()
    with pytest.raises(CheckpointError, match="No checkpoint"):
        testbed.checkpoint("SFT")


def used_parameters(testbed, encoder) -> set[str]:
    """Parameters the forward pass uses: those a backward pass gives a non-zero gradient."""
    probe = AutoModelForImageTextToText.from_pretrained(testbed.checkpoint("IN"), dtype=torch.float32)
    for part in encoder(ItemStream(5, tuple((f, 1.0) for f in FAMILIES)).take(8), targets=True):
        probe(**part.inputs).logits.float().pow(2).mean().backward()
    return {name for name, p in probe.named_parameters() if p.grad is not None and bool(p.grad.abs().gt(0).any())}


def test_rl_changed_every_tensor_and_freezing_keeps_them_bit_identical(testbed, in_model) -> None:
    model = in_model[0]
    # the policy gradient was really non-zero (rewards varied within a group), not just rounding noise
    assert any(abs(row["pg"]) > 1e-3 for row in testbed.info["rl_log"])
    base_in, rl = tensors(testbed.checkpoint("IN")), tensors(testbed.checkpoint("RL"))
    # every tensor the forward pass uses moved; the others (a pooled-output norm) did not
    used = used_parameters(testbed, in_model[2])
    spec = vlm_probe.arch.get_spec(model.config)
    for key in base_in:
        assert torch.equal(base_in[key], rl[key]) == (spec.module_path(key) not in used), key

    path = build_rl_variant(testbed, {"early", "vision"}, quiet=True)
    assert path.name == "rl-freeze-early-vision"
    variant = tensors(path)
    frozen_modules = frozen_names(model, {"early", "vision"})
    spec = vlm_probe.arch.get_spec(model.config)
    stored = {spec.module_path(k): k for k in variant}
    assert frozen_modules and set(frozen_modules) <= set(stored)
    for module_name, key in stored.items():
        same = torch.equal(variant[key], base_in[key])
        assert same == (module_name in frozen_modules or module_name not in used), module_name
    recorded = json.loads((path / "variant.json").read_text())["frozen_parameters"]
    assert recorded == sorted(frozen_modules)


def test_rl_variant_without_freezing_reproduces_rl(testbed) -> None:
    path = build_rl_variant(testbed, None, quiet=True)
    a, b = tensors(path), tensors(testbed.checkpoint("RL"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert testbed.checkpoint("rl-freeze-none") == path


@pytest.mark.parametrize("which", ["testbed", "qwen_testbed"])
def test_regions_follow_the_layer_index(which, request) -> None:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(request.getfixturevalue(which).checkpoint("IN"))
    n = model.config.text_config.num_hidden_layers
    cuts = Cuts.make(None, n)
    c1, c2 = cuts.as_tuple()
    spec = vlm_probe.arch.get_spec(model.config)
    regions = {name: region_of(loc, cuts, split_head=True) for name, loc in locate_parameters(model, spec).items()}
    for name, region in regions.items():
        if m := re.match(r"model\.language_model\.layers\.(\d+)\.", name):
            i = int(m.group(1))
            assert region == ("early" if i < c1 else "mid" if i < c2 else "late"), name
        elif name.startswith(("model.visual.merger", "model.multi_modal_projector")):
            assert region == "projector"
        elif name.startswith(("model.visual.", "model.vision_tower.")):
            assert region == "vision"
        elif name == "lm_head.weight":
            assert region == "lm_head"
        elif name.startswith("model.language_model.embed_tokens"):
            assert region == "embed"
        elif name == "model.language_model.norm.weight":
            assert region == "final_norm"
    assert set(regions.values()) == {"vision", "projector", "embed", "early", "mid", "late", "final_norm", "lm_head"}
    assert frozen_names(model, lambda name: name.endswith(".bias")) == {k for k in regions if k.endswith(".bias")}
    assert frozen_names(model, None) == frozenset()
    with pytest.raises(MergePlanError, match="Unknown region"):
        frozen_names(model, {"middle"})
    with pytest.raises(MergePlanError, match="do not split"):
        frozen_names(model, "late", cuts=(2, 2))


def test_frozen_context_restores_requires_grad(in_model) -> None:
    model = in_model[0]
    names = frozen_names(model, "late")
    with pytest.raises(RuntimeError, match="boom"):
        with frozen(model, names) as params:
            assert len(params) == sum(1 for _ in model.parameters()) - len(names)
            raise RuntimeError("boom")
    assert all(p.requires_grad for p in model.parameters())


def test_shared_prefix_decoding_matches_generate_and_full_forward(in_model) -> None:
    model, _, encoder = in_model
    items = ItemStream(11, tuple((f, 1.0) for f in FAMILIES)).take(10)
    for part in encoder(items):
        tokens = complete(model, encoder, part, max_new_tokens=3)
        plain = {k: v for k, v in part.inputs.items() if k != "position_ids"}
        generated = model.generate(**plain, max_new_tokens=3, do_sample=False, suppress_tokens=encoder.suppressed,
                                   eos_token_id=encoder.stop_id, pad_token_id=encoder.stop_id)
        expected = generated[:, plain["input_ids"].shape[1] :]
        assert torch.equal(tokens[:, : expected.shape[1]], expected)
        # teacher-forced logits over a repeated prefix equal one plain forward per full sequence
        logits = completion_logits(model, part, tokens.repeat_interleave(2, 0), 2)
        full = dict(plain, input_ids=torch.cat([plain["input_ids"], tokens], 1),
                    attention_mask=torch.cat([plain["attention_mask"], torch.ones_like(tokens)], 1))
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([full["mm_token_type_ids"], torch.zeros_like(tokens)], 1)
        with torch.no_grad():
            reference = model(**full).logits
        width = plain["input_ids"].shape[1]
        want = reference[:, width - 1 : width - 1 + tokens.shape[1]].repeat_interleave(2, 0)
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)


def test_sampling_never_emits_the_image_token(in_model) -> None:
    model, _, encoder = in_model
    items = ItemStream(12, (("perception", 1.0),)).take(6)
    part = encoder(items)[0]
    with torch.no_grad():
        prefix_logits = model(**part.inputs).logits[:, -1]
    boosted = prefix_logits.clone()
    boosted[:, model.config.image_token_id] = 1e4  # would always win without the mask
    generator = torch.Generator().manual_seed(0)
    tokens = complete(model, encoder, part, max_new_tokens=2, n=8, sample=True, generator=generator)
    assert model.config.image_token_id not in tokens.tolist()
    again = complete(model, encoder, part, max_new_tokens=2, n=8, sample=True,
                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    from vlm_probe.testbed.decoding import _choose

    chosen = _choose(boosted, encoder.suppressed, sample=False, temperature=1.0, generator=None)
    assert model.config.image_token_id not in chosen.tolist()


def test_encoder_targets_sit_at_the_end(in_model) -> None:
    model, _, encoder = in_model
    items = ItemStream(13, tuple((f, 1.0) for f in FAMILIES)).take(12)
    for part in encoder(items, targets=True):
        for row, item in enumerate(part.items):
            ids = part.input_ids[row, part.target_mask()[row]].tolist()
            assert ids == encoder.target_ids(item.response)
            assert ids[-1] == encoder.stop_id
        for row, item in enumerate(part.items):  # the targets decode back to the response, ended
            n = int(part.n_target[row])
            tail = decode_responses(encoder, part.input_ids[row : row + 1, -n:])[0]
            assert tail.text == item.response and tail.finished
    # explicit positions equal what the model computes by itself
    part = encoder(ItemStream(14, (("perception", 1.0),)).take(4))[0]
    plain = {k: v for k, v in part.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        torch.testing.assert_close(model(**part.inputs).logits, model(**plain).logits)


def test_group_advantages_and_completion_mask_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    # Dr. GRPO: reward minus the group mean, no division by the group's spread
    assert torch.equal(group_advantages(rewards, 4), torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    adv = group_advantages(rewards, 4, normalize=True)  # the original GRPO
    std = (0.75 * 0.25) ** 0.5
    torch.testing.assert_close(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)
    assert torch.equal(adv[4:], torch.zeros(4))
    tokens = torch.tensor([[5, 9, 9], [9, 5, 5], [5, 5, 5], [5, 7, 9]])
    assert completion_mask(tokens, {9, 7}).tolist() == [
        [True, True, False], [True, False, False], [True, True, True], [True, True, False]]


def test_cli_builds_the_reduced_testbed(testbed, cache, capsys) -> None:
    parser = argparse.ArgumentParser(prog="vlm-probe")
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["testbed", "build", "--reduced", "--quiet", "--cache-dir", str(cache)])
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip() == str(testbed.path)
    assert "vlm-probe testbed build --reduced" in parser._subparsers._group_actions[0].choices["testbed"].format_help()


def test_rl_effect_pairs_in_and_rl_on_shared_items(testbed, cache, tmp_path) -> None:
    import numpy as np

    from vlm_probe.results import Result
    from vlm_probe.testbed.rl_effect import RLEffect, evaluation_items, rl_effect, score_checkpoint

    result = rl_effect((0, 1), reduced=True, quiet=True, cache_dir=cache, n_resamples=200)
    frame = result.to_frame()
    families = frame[frame["by"] == "family"]
    assert set(families["seed"]) == {"0", "1", "pooled"}
    # oracle: the seed-0 rows equal accuracies computed here from per-item scores
    items = evaluation_items(testbed)
    assert {i.family for i in items} == {"perception", "v2r", "text", "described", "swap"}
    a, b = score_checkpoint(testbed, "IN", items), score_checkpoint(testbed, "RL", items)
    other = build_testbed(Recipe.reduced_size(seed=1), quiet=True, cache_dir=cache)
    assert [i.id for i in evaluation_items(other)] == [i.id for i in items]  # one shared held-out set
    a1, b1 = score_checkpoint(other, "IN", items), score_checkpoint(other, "RL", items)
    for family in ("perception", "swap"):
        index = [k for k, item in enumerate(items) if item.family == family]
        row = families[(families["seed"] == "0") & (families["group"] == family)].iloc[0]
        assert row["n"] == len(index)
        assert row["IN"] == pytest.approx(a[index].mean()) and row["RL"] == pytest.approx(b[index].mean())
        assert row["diff"] == pytest.approx(b[index].mean() - a[index].mean())
        assert row["diff_low"] <= row["diff"] <= row["diff_high"]
        pooled = families[(families["seed"] == "pooled") & (families["group"] == family)].iloc[0]
        expected = np.mean([b[index].mean() - a[index].mean(), b1[index].mean() - a1[index].mean()])
        assert pooled["diff"] == pytest.approx(expected)
    assert len(result.table()) == len(families)
    assert result.plot().data
    saved = Result.load(result.save(tmp_path / "effect"))
    assert isinstance(saved, RLEffect) and len(saved.frame) == len(frame)


def test_necessity_table_compares_frozen_rl_with_in_and_rl(testbed, in_model) -> None:
    from vlm_probe.testbed.necessity import necessity_table
    from vlm_probe.testbed.rl_effect import evaluation_items, score_checkpoint
    from vlm_probe.weights.plans import FreezePlan

    plan = FreezePlan(("mid",))
    model = in_model[0]
    assert frozen_names(model, plan) == frozen_names(model, "mid")  # the surgery module's plans plug in
    table = necessity_table(testbed, freeze=("late", plan), quiet=True, n_resamples=200)
    frame = table.to_frame()
    assert list(dict.fromkeys(frame["variant"])) == ["IN", "RL", "RL-frozen-late", "RL-frozen-mid"]
    items = evaluation_items(testbed)
    late = score_checkpoint(testbed, "rl-freeze-late", items)
    rl = score_checkpoint(testbed, "RL", items)
    index = [k for k, item in enumerate(items) if item.family == "v2r"]
    row = frame[(frame["variant"] == "RL-frozen-late") & (frame["family"] == "v2r")].iloc[0]
    assert row["accuracy"] == pytest.approx(late[index].mean())
    assert row["vs_RL"] == pytest.approx(late[index].mean() - rl[index].mean())
    assert set(table.meta["rl_reward"]) == {"RL", "RL-frozen-late", "RL-frozen-mid"}
    assert len(table.summary()) == 4 and table.plot().data
    variant = tensors(testbed.checkpoint("rl-freeze-mid"))
    base_in = tensors(testbed.checkpoint("IN"))
    spec = vlm_probe.arch.get_spec(model.config)
    frozen_mid = frozen_names(model, "mid")
    used = used_parameters(testbed, in_model[2])
    for k in variant:
        path = spec.module_path(k)
        assert torch.equal(variant[k], base_in[k]) == (path in frozen_mid or path not in used), k


# ----------------------------------------------------------------------------- testbed v2: traces, RL, one grader


@pytest.mark.parametrize("which", ["testbed", "qwen_testbed"])
def test_joined_prompt_batches_decode_as_separate_ones(which, request) -> None:
    """Sub-batches with and without images joined into one left-padded prefix give the tokens and
    the logits each gives alone (LLaVA's 1-D and Qwen2.5-VL's 3-D positions)."""
    from transformers import AutoModelForImageTextToText

    from vlm_probe.model.processors import load_processor

    path = request.getfixturevalue(which).checkpoint("IN")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    encoder = Encoder(model, load_processor(path), vlm_probe.arch.get_spec(model.config))
    parts = encoder(ItemStream(31, tuple((f, 1.0) for f in FAMILIES)).take(12))
    assert len(parts) == 3
    joint = complete(model, encoder, parts, max_new_tokens=6)
    apart = [complete(model, encoder, p, max_new_tokens=6) for p in parts]
    apart = torch.cat([torch.nn.functional.pad(a, (0, joint.shape[1] - a.shape[1]), value=encoder.stop_id) for a in apart])
    assert torch.equal(joint, apart)
    with torch.no_grad():
        together = completion_logits(model, parts, joint.repeat_interleave(2, 0), 2)
        alone, row = [], 0
        for part in parts:
            alone.append(completion_logits(model, part, joint[row : row + len(part)].repeat_interleave(2, 0), 2))
            row += len(part)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-4, rtol=1e-4)


def _expected_reward(policy, encoder, pool, n: int = 64) -> float:
    """The policy's mean reward on ``pool``, estimated from ``n`` seeded samples per prompt."""
    from vlm_probe.testbed.rl import rewards_for

    parts = encoder(pool)
    tokens = complete(policy, encoder, parts, max_new_tokens=16, n=n, sample=True,
                      generator=torch.Generator().manual_seed(9))
    answers = [item.answer for part in parts for item in part.items for _ in range(n)]
    return float(rewards_for(decode_responses(encoder, tokens), answers)[0].mean())


def test_policy_gradient_step_moves_toward_rewarded_samples(testbed) -> None:
    """One Dr. GRPO step raises sum(advantage x log p(sample)) over the very samples it scored
    (the first-order property of an ascent step), and rewards follow the harness's grader."""
    from transformers import AutoModelForImageTextToText

    from vlm_probe.evaluation import grade
    from vlm_probe.model.processors import load_processor
    from vlm_probe.testbed.rl import policy_gradient

    path = testbed.checkpoint("IN")
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    encoder = Encoder(policy, load_processor(path), vlm_probe.arch.get_spec(policy.config))
    items = ItemStream(41, (("v2r/more_color", 1.0), ("text/more", 1.0))).take(6)
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):  # find a batch whose groups disagree (the model is tiny and uncertain)
        sampled = policy_gradient(policy, None, encoder, items, group=8, kl=0.0, temperature=1.0,
                                  max_new_tokens=16, format_reward=0.1, generator=generator)
        if bool(sampled.advantages.abs().gt(0).any()):
            break
        policy.zero_grad(set_to_none=True)
    assert bool(sampled.advantages.abs().gt(0).any())
    ordered = [item for part in sampled.parts for item in part.items for _ in range(8)]
    for text, item, reward in zip(decode_responses(encoder, sampled.tokens), ordered, sampled.reward.tolist()):
        expected = float(text.finished and grade(text.text, item.answer).correct) + 0.1 * float(
            text.finished and "the answer is" in text.text)
        assert reward == pytest.approx(expected)

    def surrogate() -> float:
        with torch.no_grad():
            logp = torch.log_softmax(completion_logits(policy, sampled.parts, sampled.tokens, 8), -1)
        token = logp.gather(-1, sampled.tokens.unsqueeze(-1)).squeeze(-1)
        mask = completion_mask(sampled.tokens, encoder.end_ids).float()
        return float((sampled.advantages.unsqueeze(1) * token * mask).sum())

    before = surrogate()
    with torch.no_grad():
        for p in policy.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad  # plain gradient descent on the loss = ascent on the surrogate
    assert surrogate() > before


def test_rl_raises_the_expected_reward(testbed) -> None:
    """A dozen RL steps on a small prompt pool raise the policy's expected reward on it (estimated
    from 64 samples per prompt before and after: 0.01 -> 0.9 when measured)."""
    from vlm_probe.model.processors import load_processor

    path = testbed.checkpoint("IN")
    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    encoder = Encoder(policy, load_processor(path), vlm_probe.arch.get_spec(policy.config))
    pool = ItemStream(42, (("v2r/more_color", 1.0), ("text/more", 1.0), ("v2r/more_shape", 1.0))).take(8)
    before = _expected_reward(policy, encoder, pool)

    def cycle():
        while True:
            yield from pool

    log = grpo(policy, None, encoder, cycle(), steps=12, prompts=8, group=8, lr=3e-3, max_new_tokens=16,
               seed=0, warmup=0, lr_floor=1.0, quiet=True)  # a constant rate: the estimator alone
    after = _expected_reward(policy, encoder, pool)
    assert after > before + 0.3, (before, after)
    assert log[-1]["reward"] > log[0]["reward"]
    assert [row["lr"] for row in log] == [3e-3] * 12


def test_rl_learning_rate_warms_up_then_decays(testbed) -> None:
    path = testbed.checkpoint("IN")
    from vlm_probe.model.processors import load_processor

    policy = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    encoder = Encoder(policy, load_processor(path), vlm_probe.arch.get_spec(policy.config))
    stream = iter(ItemStream(43, (("text/more", 1.0),)))
    log = grpo(policy, None, encoder, stream, steps=6, prompts=1, group=2, lr=1e-3, max_new_tokens=4, warmup=2,
               lr_floor=0.2, quiet=True)
    # by hand: warm-up 1/2, 2/2 of the peak, then a half cosine from the peak to 0.2 of it over 4 steps
    cosine = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [row["lr"] for row in log] == pytest.approx([1e-3 * f for f in (0.5, 1.0, *cosine)])


def test_testbed_verdicts_equal_the_harness_verdicts(testbed) -> None:
    """One grader: the testbed's greedy response and verdict on each held-out item equal what the
    evaluation harness generates and grades from the written data files."""
    from vlm_probe.evaluation import PromptFormat
    from vlm_probe.evaluation import evaluate as harness_evaluate
    from vlm_probe.testbed.datasets import PROMPT_FORMAT
    from vlm_probe.testbed.train import MAX_NEW_TOKENS
    from vlm_probe.testbed.rl_effect import score_checkpoint

    from vlm_probe.testbed.tasks import Item

    held = testbed.held_out()
    white = tuple(PROMPT_FORMAT["blank_color"])
    # the harness's "description" condition asks the v2r items over a blank image with their description
    twins = [Item(f"twin-{i.id}", "described", i.task, f"{i.scene.describe()} {i.question}", i.answer, i.scene,
                  "blank", white, i.solution) for i in held if i.family == "v2r"]
    items = [i for i in held if i.family != "described"] + twins
    scored = score_checkpoint(testbed, "IN", items, detail=True)
    by_id = {item.id: (response, ok) for item, response, ok in zip(items, scored.responses, scored.verdicts)}
    vlm = testbed.load("IN")
    fmt = dict(PROMPT_FORMAT, blank_color=tuple(PROMPT_FORMAT["blank_color"]))
    checked = 0
    for name, condition, family in (("perception.jsonl", "image", "perception"), ("v2r.jsonl", "image", "v2r"),
                                    ("text.jsonl", "text", "text"), ("v2r.jsonl", "description", "described")):
        run = harness_evaluate(vlm, testbed.data / name, conditions=[condition], max_new_tokens=MAX_NEW_TOKENS,
                               prompt=PromptFormat(**fmt), quiet=True, batch_size=16)
        for row in run.frame.itertuples():
            key = row.id if family != "described" else f"twin-{row.id}"
            if key not in by_id:
                continue
            response, ok = by_id[key]
            assert row.response == response, (key, row.response, response)
            assert bool(row.correct) == ok, key
            checked += 1
    assert checked == len(items)


def test_grid_position_codes_factorise_into_row_and_column() -> None:
    """Every cell's code is row code + column code (scaled): moving one column changes the code
    by the same vector in every row; the class token keeps its own draw; a non-square table is
    refused; the LLaVA tower gets the grid, Qwen2.5-VL (no table) nothing."""
    import dataclasses

    from vlm_probe.errors import InputError
    from vlm_probe.testbed.factory import grid_positions, testbed_model

    for n, offset in ((10, 1), (16, 0)):  # CLIP (class token + 3 x 3), SigLIP (4 x 4)
        codes = grid_positions(n, 64, 2.0, torch.Generator().manual_seed(0))
        side = math.isqrt(n - offset)
        cells = codes[offset:].view(side, side, 64)
        step = cells[:, 1:] - cells[:, :-1]  # column c -> c + 1, per row
        assert torch.allclose(step, step[:1].expand_as(step), atol=1e-5)
        down = cells[1:] - cells[:-1]
        assert torch.allclose(down, down[:, :1].expand_as(down), atol=1e-5)
        assert not torch.allclose(step[0, 0], torch.zeros(64))
        assert 1.2 < float(codes.std()) < 2.8  # entries ~ N(0, std^2)
    with pytest.raises(InputError, match="square patch grid"):
        grid_positions(12, 8, 1.0, torch.Generator())
    with pytest.raises(InputError, match="Unknown position_layout 'diagonal'; use one of grid, random"):
        Recipe(position_layout="diagonal")
    with pytest.raises(InputError, match="shards must lie in 1..batch_size"):
        Recipe.reduced_size().replace(base=dataclasses.replace(Recipe.reduced_size().base, shards=0))
    sizes = Recipe.reduced_size().model_sizes
    llava = testbed_model("llava", seed=3, sizes=sizes, position_std=1.0, position_layout="grid")
    table = llava.model.get_submodule("model.vision_tower.embeddings.position_embedding").weight
    cells = table[1:].view(3, 3, -1)
    assert torch.allclose(cells[:, 1] - cells[:, 0], (cells[:, 1] - cells[:, 0])[:1].expand(3, -1), atol=1e-5)
    random = testbed_model("llava", seed=3, sizes=sizes, position_std=1.0, position_layout="random")
    cells = random.model.get_submodule("model.vision_tower.embeddings.position_embedding").weight[1:]
    cells = cells.view(3, 3, -1)
    assert not torch.allclose(cells[:, 1] - cells[:, 0], (cells[:, 1] - cells[:, 0])[:1].expand(3, -1), atol=1e-3)
    from vlm_probe.testbed.factory import vision_position_init
    qwen = testbed_model("qwen2_5_vl", seed=3, sizes=sizes)
    assert vision_position_init(qwen.model, 3, 1.0) == []


def test_data_parallel_stages_give_the_same_weights(testbed, tmp_path, monkeypatch) -> None:
    """Base and IN trained by 2 processes (one shard each, gradients summed over gloo) equal
    the one-process build bit for bit, and so does everything after them."""
    import vlm_probe.testbed.build as build

    monkeypatch.setattr(build, "data_parallel_processes", lambda workers, shards: 2)  # whatever the load
    parallel = build_testbed(reduced=True, quiet=True, cache_dir=tmp_path, workers=2, variants=("early",))
    assert parallel.info["times"]["Base"]["processes"] == 2
    assert parallel.info["losses"] == testbed.info["losses"]
    for stage in ("Base", "IN", "RL", "rl-freeze-early"):
        ours = load_file(parallel.checkpoint(stage) / "model.safetensors")
        theirs = load_file(testbed.checkpoint(stage) / "model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), stage
    assert not (parallel.path / ".init").exists()


def test_data_parallel_failure_names_the_rank_and_stops(testbed, tmp_path) -> None:
    from vlm_probe.testbed.data_parallel import DataParallelError, train_stage

    with pytest.raises(DataParallelError, match="rank 0: .*(OSError|Error)") as caught:
        train_stage(testbed.recipe, "base", tmp_path / "missing", tmp_path / "out", frozenset(), world=2, quiet=True)
    assert "rank 1" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_build_keeps_each_checkpoints_responses_and_reuses_them(testbed, in_model, tmp_path) -> None:
    """Every checkpoint of a build (variants too) holds its greedy responses to the held-out items
    and swap scenes; scoring reads them back without loading the model, equals a fresh greedy
    run, and regenerates what is missing or was asked differently."""
    import dataclasses
    import shutil

    from vlm_probe.testbed import responses
    from vlm_probe.testbed.rl_effect import evaluation_items
    from vlm_probe.testbed.train import evaluate

    items = evaluation_items(testbed)

    def no_load():
        raise AssertionError("the model was loaded although every response is stored")

    for stage in ("Base", "IN", "RL", "rl-freeze-mid"):
        responses.scored(testbed.checkpoint(stage), items, no_load)
    kept = responses.scored(testbed.checkpoint("IN"), items, no_load)
    model, _, encoder = in_model
    fresh = evaluate(model, encoder, items)
    assert kept.responses == fresh.responses and kept.verdicts == fresh.verdicts

    copy = tmp_path / "in"
    shutil.copytree(testbed.checkpoint("IN"), copy)
    changed = [dataclasses.replace(items[0], question=items[0].question.replace("?", "? ?"))] + items[1:3]
    calls = []
    again = responses.scored(copy, changed, lambda: calls.append(1) or (model, encoder))
    assert calls == [1] and again.responses[1:] == kept.responses[1:3]
    assert len(responses.stored_responses(copy)) == len(responses.stored_responses(testbed.checkpoint("IN"))) + 1
    assert responses.stored_responses(copy, max_new_tokens=5) == {}  # another budget: nothing stored


def test_data_parallel_uses_only_idle_cores(monkeypatch) -> None:
    """Processes = min(workers, shards, idle cores), idle cores measured now (/proc/stat), or
    from the load average where that cannot be read."""
    from vlm_probe import threads

    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    for busy, expected in ((0.0, 2), (2.6, 1), (1.1, 2), (3.5, 1)):
        monkeypatch.setattr(threads, "_busy_cores", lambda seconds, busy=busy: busy)
        assert threads.data_parallel_processes(4, 2) == expected, busy
    monkeypatch.setattr(threads, "_busy_cores", lambda seconds: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 0.0, 0.0))
    assert threads.data_parallel_processes(4, 2) == 1
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert threads.data_parallel_processes(1, 2) == 1 and threads.data_parallel_processes(4, 1) == 1
    assert threads.data_parallel_processes(4, 2) == 2
    busy = threads._busy_cores(0.05)  # the real reading: a share of this machine's cores
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)
