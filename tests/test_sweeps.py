"""Sweeps: properties that must hold, planted checkpoint pairs, batched == naive, data parallel."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import vlm_probe
from vlm_probe.analyses import cross_patch, layer_increments, sweep
from vlm_probe.analyses import metrics as M
from vlm_probe.analyses.ablation import knockout_sweep, layer_ablation_sweep
from vlm_probe.analyses.generation import greedy_config
from vlm_probe.errors import InputError
from vlm_probe.interventions import knockout, skip_layer
from vlm_probe.results import Result
from vlm_probe.testbed.zoo import tiny_vlm

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def setup():
    tiny = tiny_vlm("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many red circles ?"] * 4, [[tiny.image(i)] for i in range(4)])
    return vlm, tiny, batch


def test_patching_a_run_with_itself_changes_nothing(setup) -> None:
    vlm, _, batch = setup
    result = sweep(vlm, batch[:2], batch[:2], positions=["vision", "question", "all"], metric=M.kl_to_clean(),
                   progress=False)
    assert len(result.frame) == 2 * 3 * vlm.n_layers
    assert result.frame["value"].abs().max() < 1e-6  # float32 noise of batched matmuls only


@pytest.mark.parametrize("site", ["layer_in", "layer_out"])
def test_patching_every_position_at_layer_zero_restores_clean(setup, site: str) -> None:
    vlm, _, batch = setup
    result = sweep(vlm, batch[:2], batch[2:], site=site, layers=[0], positions="all", metric=M.kl_to_clean(),
                   progress=False)
    assert result.frame["value"].abs().max() < 1e-7
    logit = M.logit_diff(vlm.tokenizer, "3", "4", 2)
    result = sweep(vlm, batch[:2], batch[2:], site=site, layers=[0], positions="all", metric=logit, progress=False)
    torch.testing.assert_close(torch.tensor(result.frame["value"].values), torch.tensor(result.frame["clean"].values))
    assert (result.frame["normalized"] - 1).abs().max() < 1e-5


def test_batched_sweep_equals_one_cell_at_a_time_and_a_hooked_loop(setup) -> None:
    vlm, _, batch = setup
    clean, corrupt = batch[:2], batch[2:]
    kwargs = dict(site=["layer_out", "attn_out", "mlp_out"], positions=["vision", "last"], metric=M.kl_to_clean(),
                  progress=False)
    fast = sweep(vlm, clean, corrupt, max_rows=64, reuse_vision=True, **kwargs).frame
    slow = sweep(vlm, clean, corrupt, max_rows=2, reuse_vision=False, **kwargs).frame
    pd.testing.assert_frame_equal(fast, slow, atol=1e-6, rtol=0)
    # a naive reference for one cell: raw torch hooks, one forward
    with torch.no_grad():
        clean_out = vlm.hf(**clean.inputs, output_hidden_states=True).hidden_states[3]
        corrupt_logits = vlm.hf(**corrupt.inputs).logits[:, -1]
    mask = corrupt.layout.mask("vision")

    def hook(module, args, output):
        out = output.clone()
        out[mask] = clean_out[mask]
        return out

    handle = vlm.layers[2].envoy._module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            patched = vlm.hf(**corrupt.inputs).logits[:, -1]
    finally:
        handle.remove()
    with torch.no_grad():
        clean_logits = vlm.hf(**clean.inputs).logits[:, -1]
    expected = M.kl(clean_logits, patched)
    cell = fast[(fast.site == "layer_out") & (fast.layer == 2) & (fast.positions == "vision")]
    torch.testing.assert_close(torch.tensor(cell["value"].values, dtype=torch.float32), expected, atol=1e-6, rtol=0)
    assert (M.kl(clean_logits, corrupt_logits) > 1e-4).all()


@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen3_vl", "gemma3", "paligemma"])
def test_suffix_reruns_over_the_cache_equal_full_runs(zoo, family: str) -> None:
    """Chunks whose edits start after the image rerun only the suffix over the unpatched KV
    cache (causal families whose cache holds every position); the numbers equal full runs."""
    from vlm_probe.analyses.batched import capture, metric_index, suffix_start

    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    prompts = ["how many red circles ?", "is the big blue square left of the small circle ?"]
    clean = vlm.prepare(prompts, [[tiny.image(0)], [tiny.image(1)]])
    corrupt = vlm.prepare(prompts, [[tiny.image(2)], [tiny.image(3)]])
    clean, corrupt = vlm_probe.align(clean, corrupt)
    assert not bool(corrupt.inputs["attention_mask"].all()), "the rows are left-padded"
    kwargs = dict(site=["layer_out", "q"], positions=["vision", "question", "last"], metric=M.kl_to_clean(),
                  progress=False)
    fast = sweep(vlm, clean, corrupt, max_rows=4, reuse_vision=True, **kwargs).frame
    slow = sweep(vlm, clean, corrupt, max_rows=4, reuse_vision=False, **kwargs).frame
    pd.testing.assert_frame_equal(fast, slow, atol=1e-6, rtol=0)
    assert fast["value"].max() > 1e-4
    window = getattr(vlm.text_config, "sliding_window", None) or corrupt.width
    exact = vlm.spec.causal_text and corrupt.width <= window
    cache = capture(vlm, corrupt, cache=True).cache
    assert (cache is not None) == exact
    positions = metric_index(corrupt, "last")[1]
    last = suffix_start(vlm, corrupt, [corrupt.layout.mask("last")], positions)
    vision = suffix_start(vlm, corrupt, [corrupt.layout.mask("vision")], positions)
    assert (last, vision) == ((corrupt.width - 1, 0) if vlm.spec.causal_text else (0, 0))


def test_chunk_plan_is_the_cheapest_partition() -> None:
    """The dynamic programme equals brute force over every cut of the sorted cells."""
    import itertools

    from vlm_probe.analyses.batched import plan_chunks

    def cost(parts, starts, layers, rows, width, n_layers):
        return sum(len(p) * rows * (width - min(starts[i] for i in p)) * (n_layers - min(layers[i] for i in p))
                   + rows * width for p in parts)

    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        m = int(torch.randint(1, 9, (1,), generator=generator))
        starts = sorted(torch.randint(0, 3, (m,), generator=generator).mul(5).tolist())
        layers = [int(x) for x in torch.randint(0, 6, (m,), generator=generator)]
        layers = [layer for _, layer in sorted(zip(starts, layers))]
        max_cells = int(torch.randint(1, 5, (1,), generator=generator))
        plan = plan_chunks(starts, layers, 2, 20, 6, max_cells)
        assert [i for p in plan for i in p] == list(range(m)) and all(len(p) <= max_cells for p in plan)
        partitions = []
        for cuts in itertools.product([0, 1], repeat=m - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [m]
            parts = [range(a, b) for a, b in zip(bounds, bounds[1:])]
            if all(len(p) <= max_cells for p in parts):
                partitions.append(parts)
        best = min(cost(p, starts, layers, 2, 20, 6) for p in partitions)
        assert cost(plan, starts, layers, 2, 20, 6) == best


def test_each_position_cells(setup) -> None:
    vlm, _, batch = setup
    result = sweep(vlm, batch[:1], batch[1:2], layers=[1], positions="each:vision", metric=M.kl_to_clean(),
                   progress=False)
    assert list(result.frame["positions"]) == [str(p) for p in batch.layout[0].spans["vision"]]
    assert result.plot() is not None


def _planted_pair(a: int, b: int):
    """IN and RL checkpoints that differ only in decoder layers [a, b)."""
    base = tiny_vlm("qwen2_5_vl", n_layers=5)
    rl = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in rl.named_parameters():
            layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
            if ".language_model.layers." in name and a <= layer < b and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return vlm_probe.load(base), vlm_probe.load(rl, processor=base.processor), base


def test_cross_patching_attributes_a_planted_difference_to_its_layers() -> None:
    a, b = 1, 3
    model_in, model_rl, tiny = _planted_pair(a, b)
    batch = model_in.prepare(["how many red circles ?"] * 3, [[tiny.image(i)] for i in range(3)])
    result = cross_patch(model_in, model_rl, batch, positions="all", names=("IN", "RL"), progress=False)
    restored = result.summary().set_index("layer")["value"]
    assert restored.loc[: a - 1].abs().max() < 1e-6, "layers before the planted ones restore nothing"
    assert (restored.loc[b - 1 :] - 1).abs().max() < 1e-6, "from the last planted layer on, all is restored"
    increments = layer_increments(result).set_index("layer")["increment"]
    outside = [layer for layer in increments.index if not a <= layer < b]
    assert increments.loc[outside].abs().max() < 1e-6
    assert abs(increments.loc[list(range(a, b))].sum() - 1) < 1e-6
    # text positions rerun over IN's KV cache: the same numbers as full runs, and RL's last
    # layer at the last token gives RL's output there (everything restored)
    kwargs = dict(positions=["question", "last"], names=("IN", "RL"), progress=False)
    fast = cross_patch(model_in, model_rl, batch, **kwargs).frame
    # (the restored share divides by the IN-vs-RL difference, which scales float noise up)
    pd.testing.assert_frame_equal(fast, cross_patch(model_in, model_rl, batch, reuse_vision=False, **kwargs).frame,
                                  atol=1e-4, rtol=0)
    final = fast[(fast.layer == model_in.n_layers - 1) & (fast.positions == "last")]
    assert (final["value"] - 1).abs().max() < 1e-5
    # the checkpoint-set front end runs both directions
    models = vlm_probe.load_set(IN=model_in, RL=model_rl)
    both = vlm_probe.analyses.cross_checkpoint_sweep(models, batch, positions="all", progress=False)
    assert set(both.frame["receiver"]) == {"IN", "RL"}


def test_cross_patch_refuses_different_architectures(setup, zoo) -> None:
    vlm, _, batch = setup
    other = vlm_probe.load(zoo("qwen2_5_vl", d_mlp=96))
    with pytest.raises(vlm_probe.errors.CheckpointMismatchError):
        cross_patch(vlm, other, batch, progress=False)


def test_sweep_refuses_misaligned_batches(setup, zoo) -> None:
    vlm, tiny, batch = setup
    longer = vlm.prepare("how many red circles are there in this picture ?", images=[tiny.image(9)])
    with pytest.raises(InputError, match="align"):
        sweep(vlm, batch[:1], longer, progress=False)


def test_layer_ablation_sweep_matches_single_runs(setup) -> None:
    vlm, tiny, batch = setup
    answers = ["3", "4", "5", "6"]
    result = layer_ablation_sweep(vlm, batch[:2], answers[:2], layers=[1, 3], max_new_tokens=4, progress=False)
    config = greedy_config(vlm, 4)
    for layer in (1, 3):
        with torch.no_grad(), vlm.generate(batch[:2], generation_config=config) as tracer:
            for _ in tracer.iter[0:4]:
                skip_layer(vlm, layer)
            ids = tracer.result.save()
        expected = vlm_probe.analyses.generation.decode_new(vlm, ids, batch.width)
        got = list(result.frame[result.frame.layer == layer].sort_values("sample")["answer"])
        assert got == expected
    baseline = list(result.frame[result.frame.layer == -1]["answer"])
    assert baseline == vlm_probe.analyses.generation.generate_texts(vlm, batch[:2], config)
    assert {"value", "change", "low", "high"} <= set(result.summary().columns)


def test_logprob_ablation_and_knockout_match_single_runs(setup, zoo) -> None:
    vlm, tiny, _ = setup
    batch = vlm.prepare(["how many red circles ?"] * 2, [[tiny.image(1)], [tiny.image(2)]], answers=["3", "4"])
    ablation = layer_ablation_sweep(vlm, batch, level="logprob", progress=False)
    ko = knockout_sweep(vlm, batch, queries="generated", keys="vision", level="logprob", progress=False)
    ids = batch.inputs["input_ids"]

    def answer_logprob(edit) -> torch.Tensor:
        with torch.no_grad(), vlm.trace(batch):
            edit()
            logits = vlm.lm_head.output.save()
        out = []
        for r, layout in enumerate(batch.layout):
            out.append(sum(float(logits[r, p - 1].log_softmax(-1)[ids[r, p]]) for p in layout.spans["answer"]))
        return torch.tensor(out)

    for layer in range(vlm.n_layers):
        expected = answer_logprob(lambda: skip_layer(vlm, layer))
        got = torch.tensor(list(ablation.frame[ablation.frame.layer == layer].sort_values("sample")["logprob"]))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        queries = torch.zeros_like(batch.layout.mask("vision"))
        for r, layout in enumerate(batch.layout):
            queries[r, layout.spans["last_prompt"][0]:] = True
        expected = answer_logprob(lambda: knockout(vlm, layer, queries, batch.layout.mask("vision")))
        got = torch.tensor(list(ko.frame[ko.frame.layer == layer].sort_values("sample")["logprob"]))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_results_save_and_load(setup, tmp_path) -> None:
    vlm, _, batch = setup
    result = sweep(vlm, batch[:2], batch[2:], positions="vision", progress=False)
    result.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert type(back).__name__ == "PatchingResult"
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate's launcher is not installed")
def test_sweep_split_across_two_processes_equals_one(tmp_path, setup) -> None:
    """logit_diff (per-sample target tokens) and per-sample graders on 3 samples split 2 + 1
    over two gloo processes give exactly the one-process table."""
    sys.path.insert(0, str(HERE / "scripts"))
    try:
        from dp_common import graders, metric, prompts
    finally:
        sys.path.pop(0)
    vlm, tiny, _ = setup
    launcher = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    out = tmp_path / "two.pkl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE / "scripts"), *sys.path])}
    proc = subprocess.run(
        [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(HERE / "scripts" / "dp_sweep.py"), str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "world=(1, 2)" in proc.stdout, "the sweep did not run in two processes"
    two = pd.read_pickle(out)
    clean, corrupt = prompts(vlm, tiny)
    one = sweep(vlm, clean, corrupt, site=["layer_out", "mlp_out"], positions=["vision", "last"],
                metric=metric(vlm), progress=False).frame
    pd.testing.assert_frame_equal(one, two["patching"], atol=1e-5, rtol=0)
    ablation = layer_ablation_sweep(vlm, corrupt, grader=graders(), max_new_tokens=3, progress=False).frame
    pd.testing.assert_frame_equal(ablation, two["ablation"])
    assert ablation["correct"].any() and not ablation["correct"].all()


def test_parallelism_is_never_switched_on_by_the_environment(setup, monkeypatch) -> None:
    """Inside a torchrun job (WORLD_SIZE set) a sweep still runs every sample unless asked."""
    from vlm_probe.analyses.parallel import shard_indices, world

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert world() == (0, 1) and shard_indices(5) == [0, 1, 2, 3, 4]
    vlm, _, batch = setup
    frame = sweep(vlm, batch[:2], batch[2:], layers=[0], metric=M.kl_to_clean(), progress=False).frame
    assert sorted(set(frame["sample"])) == [0, 1]


def test_answer_sweep_matches_single_patched_generations(setup) -> None:
    from vlm_probe.analyses import answer_sweep
    from vlm_probe.analyses.generation import decode_new, generate_texts
    from vlm_probe.interventions import patch

    vlm, _, batch = setup
    clean, corrupt = batch[:2], batch[2:]
    result = answer_sweep(vlm, clean, corrupt, layers=[0, 2], positions=["vision", "all"], max_new_tokens=4,
                          progress=False)
    config = greedy_config(vlm, 4)
    with torch.no_grad():
        clean_out = vlm.hf(**clean.inputs, output_hidden_states=True).hidden_states
    corrupt_answers = generate_texts(vlm, corrupt, config)
    for layer in (0, 2):
        for positions in ("vision", "all"):
            with torch.no_grad(), vlm.generate(corrupt, generation_config=config) as tracer:
                patch(vlm, corrupt, "layer_out", layer, positions, clean_out[layer + 1])
                ids = tracer.result.save()
            expected = decode_new(vlm, ids, corrupt.width)
            cell = result.frame[(result.frame.layer == layer) & (result.frame.positions == positions)]
            assert list(cell["answer"]) == expected
            assert list(cell["value"]) == [float(a != b) for a, b in zip(expected, corrupt_answers)]
    everything = result.frame[(result.frame.layer == 0) & (result.frame.positions == "all")]
    assert everything["matches_clean"].all(), "patching every position at layer 0 must give the clean answer"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "idefics3"])
def test_patching_every_vision_block_and_the_projector_matches_torch_hooks(zoo, family: str) -> None:
    """Each vision block's output (and the projector's) of the clean run put into the corrupt
    run by a plain forward hook (prepended, so transformers' own output recorders see the
    replacement, as they see an nnsight edit): the sweep's values equal the hooked forwards' KL."""
    tiny = zoo(family)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many red circles ?"] * 4, [[tiny.image(i)] for i in range(4)])
    clean, corrupt = batch[:2], batch[2:]
    result = sweep(vlm, clean, corrupt, site=["vision_out", "projector"], metric=M.kl_to_clean(), progress=False)
    frame = result.frame
    assert len(frame) == 2 * (vlm.vision.depth + 1)
    assert sorted(set(frame["unified_layer"])) == list(range(-vlm.vision.depth, 1))
    with torch.no_grad():
        clean_logits = vlm.hf(**clean.inputs).logits[:, -1]
    modules = [(("vision_out", j), vlm.vision.blocks[j]._module) for j in range(vlm.vision.depth)]
    modules.append((("projector", 0), vlm.projector._module))
    for (site, index), module in modules:
        saved = {}
        grab = module.register_forward_hook(lambda m, a, o: saved.setdefault("out", o))
        with torch.no_grad():
            vlm.hf(**clean.inputs)
        grab.remove()
        put = module.register_forward_hook(lambda m, a, o: saved["out"], prepend=True)
        try:
            with torch.no_grad():
                patched = vlm.hf(**corrupt.inputs).logits[:, -1]
        finally:
            put.remove()
        expected = M.kl(clean_logits, patched)
        got = frame[(frame.site == site) & (frame.layer == index)].sort_values("sample")["value"]
        torch.testing.assert_close(torch.tensor(got.values, dtype=torch.float32), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        unpatched = M.kl(clean_logits, vlm.hf(**corrupt.inputs).logits[:, -1])
    assert float(unpatched.min()) > 1e-4, "the images must matter"
    projector = frame[frame.site == "projector"]["value"]
    assert projector.abs().max() < 1e-6, "the clean projector output makes the LLM's input the clean one"


def test_cross_patching_the_vision_tower_attributes_a_planted_difference() -> None:
    """IN and RL differ only in the last vision block: patching RL's vision blocks into IN
    restores nothing before it and everything from it on (and the projector restores all)."""
    base = tiny_vlm("qwen2_5_vl")
    rl = copy.deepcopy(base.model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in rl.named_parameters():
            if ".visual.blocks.1." in name and param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * 1.0)
    model_in, model_rl = vlm_probe.load(base), vlm_probe.load(rl, processor=base.processor)
    batch = model_in.prepare(["how many red circles ?"] * 2, [[base.image(i)] for i in range(2)])
    frame = cross_patch(model_in, model_rl, batch, site=["vision_out", "projector"], names=("IN", "RL"),
                        progress=False).summary().set_index(["site", "layer"])["value"]
    # (restored divides by the IN-vs-RL KL, which scales float noise up)
    assert abs(frame.loc[("vision_out", 0)]) < 1e-4
    assert abs(frame.loc[("vision_out", 1)] - 1) < 1e-4 and abs(frame.loc[("projector", 0)] - 1) < 1e-4


def test_negative_layers_equal_their_positive_counterparts_in_every_sweep(setup) -> None:
    from vlm_probe.analyses import answer_sweep, attention_mass, collect, vision_swap_sweep

    vlm, tiny, batch = setup
    n = vlm.n_layers
    clean, corrupt = batch[:2], batch[2:]
    quiet = dict(progress=False)

    def same(a, b):
        pd.testing.assert_frame_equal(a.frame.drop(columns=["variant"], errors="ignore"),
                                      b.frame.drop(columns=["variant"], errors="ignore"))

    same(sweep(vlm, clean, corrupt, layers=[-1, 0], metric=M.kl_to_clean(), **quiet),
         sweep(vlm, clean, corrupt, layers=[n - 1, 0], metric=M.kl_to_clean(), **quiet))
    neg = sweep(vlm, clean, corrupt, layers=[-1], metric=M.kl_to_clean(), **quiet).frame
    assert set(neg["layer"]) == {n - 1} and set(neg["unified_layer"]) == {n}
    same(sweep(vlm, clean, corrupt, site="vision_out", layers=[-1], **quiet),
         sweep(vlm, clean, corrupt, site="vision_out", layers=[vlm.vision.depth - 1], **quiet))
    same(cross_patch(vlm, vlm, corrupt, layers=[-2], **quiet), cross_patch(vlm, vlm, corrupt, layers=[n - 2], **quiet))
    same(answer_sweep(vlm, clean, corrupt, layers=[-1], max_new_tokens=3, **quiet),
         answer_sweep(vlm, clean, corrupt, layers=[n - 1], max_new_tokens=3, **quiet))
    ablation = layer_ablation_sweep(vlm, corrupt, ["3", "4"], layers=[-1], max_new_tokens=3, **quiet)
    same(ablation, layer_ablation_sweep(vlm, corrupt, ["3", "4"], layers=[n - 1], max_new_tokens=3, **quiet))
    assert sorted(set(ablation.frame["layer"])) == [-1, n - 1], "[-1] is the last layer, not the baseline"
    same(knockout_sweep(vlm, corrupt, ["3", "4"], layers=[-1], level="answer", max_new_tokens=3, **quiet),
         knockout_sweep(vlm, corrupt, ["3", "4"], layers=[n - 1], level="answer", max_new_tokens=3, **quiet))
    same(vision_swap_sweep(vlm, corrupt, clean, layers=[-1], max_new_tokens=3, **quiet),
         vision_swap_sweep(vlm, corrupt, clean, layers=[n - 1], max_new_tokens=3, **quiet))
    same(attention_mass(vlm, corrupt, layers=[-1], **quiet), attention_mass(vlm, corrupt, layers=[n - 1], **quiet))
    a, b = collect(vlm, corrupt, layers=[-1], **quiet), collect(vlm, corrupt, layers=[n - 1], **quiet)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a.keys())
    with pytest.raises(vlm_probe.errors.LayerIndexError):
        sweep(vlm, clean, corrupt, layers=[n], **quiet)


def test_every_clean_corrupt_sweep_refuses_unpaired_batches_and_names_align(setup) -> None:
    from vlm_probe.analyses import answer_sweep, attribution_sweep

    vlm, tiny, batch = setup
    longer = vlm.prepare(["how many red circles are there in the picture ?"] * 4, [[tiny.image(i)] for i in range(4)])
    for run in (sweep, attribution_sweep, answer_sweep):
        for clean, corrupt in ((batch, batch[:2]), (batch, longer)):
            with pytest.raises(InputError, match=r"same samples and width.*vlm_probe\.align"):
                run(vlm, clean, corrupt, progress=False)
