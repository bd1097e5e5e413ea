"""Model surgery: merge plans, in-memory splices, merge writers, freezing plans."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save

import vlm_probe
from vlm_probe.arch import get_spec
from vlm_probe.errors import CheckpointMismatchError, MergePlanError, VLMProbeError
from vlm_probe.testbed.zoo import tiny_vlm
from vlm_probe.weights.freezing import apply_freeze, frozen, frozen_parameter_names, name_patterns, peft_layers_to_transform
from vlm_probe.weights.merge import read_provenance, splice, write_merge
from vlm_probe.weights.plans import (
    FreezePlan,
    MergePlan,
    Rule,
    block_grid,
    interpolation,
    published_variants,
    thirds_plan,
)
from vlm_probe.weights.reader import open_checkpoint

N_LAYERS = 6


def _perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return other


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """IN, RL and Base checkpoints of one tiny Qwen2.5-VL on disk, and the IN model object."""
    root = tmp_path_factory.mktemp("trio")
    tiny = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS)
    tiny.save(root / "IN")
    for name, seed in (("RL", 1), ("Base", 2)):
        model = _perturbed(tiny.model, seed)
        model.save_pretrained(root / name)
        vlm_probe.model.processors.save_processor(tiny.processor, root / name)
    paths = {name: root / name for name in ("IN", "RL", "Base")}
    return paths, tiny


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_splice_with_itself_and_alpha_zero_are_bit_exact(trio) -> None:
    paths, tiny = trio
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model
    before = _state(model)
    with splice(model, MergePlan("IN", (Rule(("all",), "IN"),)), paths) as summary:
        assert summary.changed and _equal(_state(model), before)
    with splice(model, MergePlan("IN", (Rule(("all",), "RL", "linear", 0.0),)), paths):
        assert _equal(_state(model), before)
    assert _equal(_state(model), before)


def test_alpha_one_region_holds_exactly_the_donors_tensors(trio) -> None:
    paths, _ = trio
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model
    rl = open_checkpoint(paths["RL"])
    host = open_checkpoint(paths["IN"])
    spec = get_spec("qwen2_5_vl")
    with splice(model, MergePlan("IN", (Rule(("mid",), "RL", "linear", 1.0),), cuts=(2, 4)), paths):
        params = dict(model.named_parameters())
        for name, entry in rl.tensors.items():
            layer = entry.location.layer
            in_mid = entry.location.region.value == "llm" and 3 <= layer <= 4
            expected = rl.tensor(name) if in_mid else host.tensor(name)
            assert torch.equal(params[name].detach(), expected), name
    assert spec.name == "qwen2_5_vl"


def test_linear_and_task_arithmetic_match_hand_computation(trio) -> None:
    paths, _ = trio
    ckpts = {name: open_checkpoint(p) for name, p in paths.items()}
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model
    name = "model.language_model.layers.5.mlp.up_proj.weight"  # a "late" layer of 6
    host, rl, base = (ckpts[n].tensor(name) for n in ("IN", "RL", "Base"))
    with splice(model, MergePlan("IN", (Rule(("late",), "RL", "linear", 0.3),)), ckpts):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), 0.7 * host + 0.3 * rl,
                                   atol=1e-7, rtol=0)
    with splice(model, MergePlan("IN", (Rule(("late",), "RL", "task_arithmetic", 0.5, base="Base"),)), ckpts):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), host + 0.5 * (rl - base),
                                   atol=1e-7, rtol=0)


def test_restore_after_an_exception_is_bit_exact(trio) -> None:
    paths, _ = trio
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model
    before = _state(model)
    with pytest.raises(RuntimeError, match="inside"):
        with splice(model, thirds_plan("IN:RL:RL"), paths):
            assert not _equal(_state(model), before)
            raise RuntimeError("inside the splice")
    assert _equal(_state(model), before)


def test_written_merge_reloads_with_the_splices_logits(trio, tmp_path) -> None:
    paths, tiny = trio
    plan = thirds_plan("IN:RL:IN", cuts=(2, 4))
    out = write_merge(plan, paths, tmp_path / "merged", max_shard_size="20KB", progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1, "small shards: several files and an index"
    for shard in shards:  # streamed shards are the bytes safetensors itself writes for their tensors
        assert shard.read_bytes() == save(load_file(shard), metadata={"format": "pt"}), shard.name
    merged = vlm_probe.load(out)
    host = vlm_probe.load(paths["IN"])
    batch = host.prepare("how many red circles ?", images=[tiny.image(1)])
    with torch.no_grad():
        written_logits = merged.hf(**batch.inputs).logits
        with splice(host.hf, plan, paths):
            spliced_logits = host.hf(**batch.inputs).logits
        plain = host.hf(**batch.inputs).logits
    assert torch.equal(written_logits, spliced_logits)
    assert not torch.equal(written_logits, plain)
    provenance = read_provenance(out)
    assert provenance["plan"]["name"] == "IN:RL:IN"
    assert MergePlan.from_yaml((out / "merge_plan.yaml").read_text()) == plan
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_writer_refuses_overwrite_and_input_directories(trio, tmp_path) -> None:
    paths, _ = trio
    plan = thirds_plan("IN:RL:RL")
    write_merge(plan, paths, tmp_path / "m", progress=False)
    with pytest.raises(VLMProbeError, match="overwrite=True"):
        write_merge(plan, paths, tmp_path / "m", progress=False)
    write_merge(plan, paths, tmp_path / "m", overwrite=True, progress=False)
    with pytest.raises(MergePlanError, match="input checkpoint"):
        write_merge(plan, paths, paths["IN"] / "merged", progress=False)


def test_killed_writer_leaves_no_directory(trio, tmp_path) -> None:
    paths, _ = trio
    out = tmp_path / "killed"
    script = (
        "import sys, time\n"
        "from vlm_probe.weights import merge\n"
        "from vlm_probe.weights.plans import thirds_plan\n"
        "real = merge.combine\n"
        "def slow(*args):\n"
        "    time.sleep(0.05)\n"
        "    return real(*args)\n"
        "merge.combine = slow  # slow the writer down so the kill lands mid-write\n"
        f"merge.write_merge(thirds_plan('IN:RL:RL'), {{'IN': {str(paths['IN'])!r}, 'RL': {str(paths['RL'])!r}}},\n"
        f"                  {str(out)!r}, max_shard_size=1, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".killed.*.partial/*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    assert not out.exists(), "a killed write must leave nothing at the final path"


def test_validation_names_the_problem(trio, tmp_path, zoo) -> None:
    paths, _ = trio
    zoo("llava").save(tmp_path / "llava")
    with pytest.raises(CheckpointMismatchError, match="LLaVA"):
        write_merge(thirds_plan("IN:RL:RL"), {"IN": paths["IN"], "RL": tmp_path / "llava"}, tmp_path / "x")
    with pytest.raises(MergePlanError, match="finite"):
        write_merge(MergePlan("IN", (Rule(("llm",), "RL", "linear", float("nan")),)), paths, tmp_path / "x")
    with pytest.raises(MergePlanError, match="reaches decoder layer 9"):
        write_merge(MergePlan("IN", (Rule(("layers:2-9",), "RL"),)), paths, tmp_path / "x")
    with pytest.raises(MergePlanError, match="Unknown region"):
        MergePlan("IN", (Rule(("middle",), "RL"),)).check(["IN", "RL"])
    with pytest.raises(MergePlanError, match="base="):
        MergePlan("IN", (Rule(("llm",), "RL", "task_arithmetic"),)).check(["IN", "RL"])
    with pytest.raises(MergePlanError, match="not one of the checkpoints"):
        write_merge(thirds_plan("IN:SFT:SFT"), paths, tmp_path / "x")
    assert not (tmp_path / "x").exists(), "nothing is written when validation fails"


def test_presets_and_yaml() -> None:
    variants = published_variants("IN", "RL", cuts=(9, 18))
    assert list(variants) == ["IN:RL:RL", "RL:IN:IN", "IN:IN:RL", "RL:RL:IN", "IN:RL:IN", "RL:IN:RL"]
    plan = variants["RL:IN:RL"]  # the published host: the early third's source
    assert plan.host == "RL" and [(r.regions, r.source) for r in plan.rules] == [(("mid",), "IN")]
    kept = published_variants("IN", "RL", cuts=(9, 18), host="IN")["RL:IN:RL"]
    assert kept.host == "IN" and [r.regions for r in kept.rules] == [("early",), ("late",)]
    # the host follows the pattern's position, never the checkpoints' names
    assert thirds_plan("RL:IN:IN").host == "RL" and thirds_plan("RL:SFT:SFT").host == "RL"
    assert thirds_plan("SFT:RL:RL").host == "SFT" and thirds_plan("RL:IN:IN", host="IN").host == "IN"
    text = plan.to_yaml()
    assert yaml.safe_load(text)["cuts"] == [9, 18]
    assert MergePlan.from_yaml(text) == plan
    grid = block_grid("IN", "RL", 4, block=2)
    assert list(grid) == ["IN+RL[0:2]", "IN+RL[1:3]", "IN+RL[2:4]"]
    full = block_grid("IN", "RL", 4, block=None)
    spans = {(r.regions[0]) for plan in full.values() for r in plan.rules}
    assert len(full) == 4 * 5 // 2 and "layers:0-3" in spans and "layers:3" in spans
    with pytest.raises(MergePlanError):
        block_grid("IN", "RL", 4, block=5)
    assert interpolation("IN", "RL", [0.0, 0.5])["IN->RL alpha=0.5"].rules[0].alpha == 0.5


def test_published_variants_take_each_third_from_its_named_checkpoint(trio) -> None:
    paths, _ = trio
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model  # holds IN's weights
    for host in ("early", "IN"):
        for name, plan in published_variants(cuts=(2, 4), host=host).items():
            with splice(model, plan, paths, loaded="IN") as summary:
                changed_layers = sorted({int(n.split(".")[3]) for n in summary.changed if ".layers." in n
                                         and "visual" not in n})
                outside = {n for n in summary.changed if ".layers." not in n or "visual" in n}
            expected = [d for d, src in zip(range(N_LAYERS), [p for p in name.split(":") for _ in range(2)])
                        if src == "RL"]
            assert changed_layers == expected, (host, name)
            takes_rl_host = host == "early" and name.startswith("RL")
            assert bool(outside) == takes_rl_host, (host, name)
            if takes_rl_host:
                assert any("visual" in n for n in outside) and any("embed" in n for n in outside)
                assert "lm_head.weight" in outside


def _hand_splice(paths: dict[str, Path], pattern: str, host: str, cuts: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The published splice, by hand: load the host model whole, then copy each third's decoder
    layers from its source with ``load_state_dict`` (the published code's host is the early
    third's source)."""
    from transformers import AutoModelForImageTextToText

    parts = pattern.split(":")
    base = AutoModelForImageTextToText.from_pretrained(paths[parts[0] if host == "early" else host])
    layers = base.model.language_model.layers
    bounds = [(0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], len(layers))]
    for source, (start, stop) in zip(parts, bounds):
        donor = AutoModelForImageTextToText.from_pretrained(paths[source]).model.language_model.layers
        for i in range(start, stop):
            layers[i].load_state_dict(donor[i].state_dict())
    return _state(base)


@pytest.mark.parametrize("host", ["early", "IN"])
def test_variants_equal_a_hand_splice_for_both_host_choices(trio, tmp_path, host: str) -> None:
    paths, _ = trio
    ckpts = {k: open_checkpoint(v) for k, v in paths.items()}
    assert all(not torch.equal(ckpts["IN"].tensor(n), ckpts["RL"].tensor(n)) for n in ckpts["IN"].tensors), \
        "the trio must differ in every tensor, or a wrong host could go unnoticed"
    cuts = (2, 4)
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model  # IN's weights
    for name, plan in published_variants("IN", "RL", cuts=cuts, host=host).items():
        expected = _hand_splice(paths, name, host, cuts)
        with splice(model, plan, paths, loaded="IN"):
            assert _equal(_state(model), expected), (host, name)
        if name == "RL:IN:RL":  # the written checkpoint holds the same tensors
            written = vlm_probe.weights.reader.open_checkpoint(write_merge(plan, paths, tmp_path / host,
                                                                           progress=False))
            assert all(torch.equal(written.tensor(k), expected[k]) for k in written.tensors), host


def test_freezing_plan_masks_summarizes_and_exports(trio) -> None:
    _, tiny = trio
    model = tiny_vlm("qwen2_5_vl", n_layers=N_LAYERS).model
    spec = get_spec("qwen2_5_vl")
    plan = FreezePlan(("early", "vision"), cuts=(2, 4))
    with frozen(model, plan, spec) as summary:
        names = set(frozen_parameter_names(model, plan, spec))
        for name, param in model.named_parameters():
            assert param.requires_grad == (name not in names)
        table = summary.frame.set_index("region")
        assert table.loc["early", "trainable"] == 0 and table.loc["vision", "trainable"] == 0
        assert table.loc["mid", "frozen"] == 0 and table.loc["late", "frozen"] == 0
        assert summary.frozen == sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored on exit"
    assert peft_layers_to_transform(plan, N_LAYERS) == [2, 3, 4, 5]
    import re

    patterns = [re.compile(p) for p in name_patterns(plan, spec, N_LAYERS)]
    matched = {n for n, _ in model.named_parameters() if any(r.search(n) for r in patterns)}
    assert matched == names
    apply_freeze(model, FreezePlan(("late",), cuts=(2, 4)), spec)
    assert not model.model.language_model.layers[5].mlp.up_proj.weight.requires_grad
    assert model.model.language_model.layers[0].mlp.up_proj.weight.requires_grad


MERGEKIT = Path(os.environ.get("VLM_PROBE_MERGEKIT", Path(__file__).resolve().parents[1] / ".venv" / "mergekit"))


@pytest.mark.skipif(not (MERGEKIT / "mergekit").is_dir(),
                    reason=f"mergekit is not installed at {MERGEKIT} (make install puts it there)")
@pytest.mark.parametrize("which", ["passthrough", "linear"])
def test_merge_equals_mergekit_tensor_for_tensor(trio, tmp_path, which: str) -> None:
    from vlm_probe.weights.merge import open_all
    from vlm_probe.weights.mergekit_export import mergekit_yaml

    paths, _ = trio
    ckpts = open_all({"IN": paths["IN"], "RL": paths["RL"]})
    plan = thirds_plan("IN:RL:IN", cuts=(2, 4)) if which == "passthrough" else \
        MergePlan("IN", (Rule(("all",), "RL", "linear", 0.25),))
    (tmp_path / "mergekit.yml").write_text(mergekit_yaml(plan, ckpts))
    ours = open_checkpoint(write_merge(plan, ckpts, tmp_path / "ours", progress=False))
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit.scripts.run_yaml", str(tmp_path / "mergekit.yml"), str(tmp_path / "theirs"),
         "--no-lazy-unpickle"],
        env={**os.environ, "PYTHONPATH": str(MERGEKIT), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = open_checkpoint(tmp_path / "theirs")
    assert set(ours.tensors) == set(theirs.tensors)
    for name in ours.tensors:
        assert torch.equal(ours.tensor(name), theirs.tensor(name)), name


def test_mergekit_export_refuses_what_it_cannot_express(trio, zoo, tmp_path) -> None:
    from vlm_probe.weights.merge import open_all
    from vlm_probe.weights.mergekit_export import to_mergekit

    paths, _ = trio
    ckpts = open_all({"IN": paths["IN"], "RL": paths["RL"]})
    with pytest.raises(MergePlanError, match="final norm and lm_head"):
        to_mergekit(thirds_plan("IN:RL:RL"), ckpts)
    zoo("llava").save(tmp_path / "llava")
    with pytest.raises(MergePlanError, match="no module definitions for LLaVA"):
        to_mergekit(thirds_plan("IN:IN:IN"), open_all({"IN": tmp_path / "llava"}))


def test_merge_command(trio, tmp_path) -> None:
    from vlm_probe.cli import main

    paths, _ = trio
    args = ["merge", "--ckpt", f"IN={paths['IN']}", "--ckpt", f"RL={paths['RL']}", "--preset", "IN:RL:IN",
            "--cuts", "2,4", "--out", str(tmp_path / "m"), "--mergekit", str(tmp_path / "mk.yml"), "-q"]
    assert main(args) == 0
    assert read_provenance(tmp_path / "m")["plan"]["name"] == "IN:RL:IN"
    assert "passthrough" in (tmp_path / "mk.yml").read_text()
    assert main(args) == 2, "an existing output is refused"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(thirds_plan("IN:RL:RL", cuts=(2, 4)).to_yaml())
    assert main(["merge", "--ckpt", f"IN={paths['IN']}", "--ckpt", f"RL={paths['RL']}", "--plan", str(plan_file),
                 "--out", str(tmp_path / "m2"), "-q"]) == 0
