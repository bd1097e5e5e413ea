"""Loading by path, checkpoint sets, family registration, scale paths, and bad inputs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import vlm_probe
from vlm_probe.arch import FamilyRegistry, get_spec, register_family
from vlm_probe.errors import (
    CheckpointError,
    CheckpointMismatchError,
    InputError,
    LayerIndexError,
    NoOpInterventionError,
    SpecMismatchError,
    UnknownFamilyError,
    UnsafeCheckpointError,
)
from vlm_probe.testbed.zoo import tiny_vlm


@pytest.fixture(scope="module")
def saved_qwen(tmp_path_factory, zoo):
    path = tmp_path_factory.mktemp("qwen")
    return zoo("qwen2_5_vl").save(path)


def test_load_by_path_equals_in_memory(family: str, zoo, tmp_path) -> None:
    tiny = zoo(family)
    tiny.save(tmp_path)
    from_disk = vlm_probe.load(tmp_path)
    in_memory = vlm_probe.load(tiny)
    assert from_disk.spec.name == family
    batch = in_memory.prepare("how many red circles ?", images=[tiny.image()])
    batch_disk = from_disk.prepare("how many red circles ?", images=[tiny.image()])
    for key in batch.inputs:
        assert torch.equal(batch.inputs[key], batch_disk.inputs[key]), key
    with torch.no_grad():
        assert torch.equal(from_disk.hf(**batch.inputs).logits, in_memory.hf(**batch.inputs).logits)


def test_device_map_with_cpu_and_disk_offload(tmp_path, zoo) -> None:
    tiny = tiny_vlm("qwen2_5_vl", d_model=128, n_layers=6)
    tiny.save(tmp_path / "ckpt")
    reference = vlm_probe.load(tmp_path / "ckpt")
    split = vlm_probe.load(
        tmp_path / "ckpt", device_map="auto", max_memory={"cpu": "600KB"}, offload_folder=tmp_path / "offload"
    )
    placement = set(split.hf.hf_device_map.values())
    assert placement == {"cpu", "disk"}, placement
    batch = reference.prepare("how many ?", images=[tiny.image()])
    with torch.no_grad():
        want = reference.hf(**batch.inputs).logits
    with split.trace(batch):
        hidden = split.layers[4].output.save()
        logits = split.lm_head.output.save()
    with reference.trace(batch):
        hidden_ref = reference.layers[4].output.save()
    assert torch.equal(logits, want)
    assert torch.equal(hidden, hidden_ref)


def test_remote_execution_dry_run(qwen, zoo) -> None:
    """nnsight's local simulation serializes the trace as for NDIF, hides vlm_probe, and runs it."""
    from vlm_probe.interventions import knockout, patch

    batch = qwen.prepare("how many ?", images=[zoo("qwen2_5_vl").image()])
    vision = batch.layout.vision
    queries, keys = batch.layout.mask("last"), batch.layout.mask("vision")
    with qwen.trace(batch, remote="local"):
        saved = qwen.layers[1].output[:, vision].save()
        patch(qwen, batch, "layer_out", 2, "vision", torch.zeros(()))
        knockout(qwen, 3, queries, keys)
        remote_logits = qwen.lm_head.output.save()
    with qwen.trace(batch):
        local = qwen.layers[1].output[:, vision].save()
        patch(qwen, batch, "layer_out", 2, "vision", torch.zeros(()))
        knockout(qwen, 3, queries, keys)
        local_logits = qwen.lm_head.output.save()
    assert torch.equal(saved, local) and torch.equal(remote_logits, local_logits)
    with torch.no_grad():
        assert not torch.equal(local_logits, qwen.hf(**batch.inputs).logits)


def test_checkpoint_set_runs_same_inputs(zoo) -> None:
    models = vlm_probe.load_set(IN=zoo("qwen2_5_vl", seed=1), RL=zoo("qwen2_5_vl", seed=2))
    assert list(models) == ["IN", "RL"]
    batch = models.prepare("how many ?", images=[zoo("qwen2_5_vl").image()])
    outs = {}
    for name, vlm in models.items():
        with vlm.trace(batch):
            outs[name] = vlm.lm_head.output.save()
    assert not torch.equal(outs["IN"], outs["RL"])


def test_checkpoint_set_refuses_mismatched_models(zoo) -> None:
    with pytest.raises(CheckpointMismatchError, match="LLaVA"):
        vlm_probe.load_set(IN=zoo("qwen2_5_vl"), RL=zoo("llava"))
    with pytest.raises(CheckpointMismatchError, match="shape"):
        vlm_probe.load_set(IN=zoo("qwen2_5_vl"), RL=zoo("qwen2_5_vl", d_mlp=96))
    with pytest.raises(CheckpointMismatchError, match="different tensors"):
        vlm_probe.load_set(IN=zoo("qwen2_5_vl"), RL=zoo("qwen2_5_vl", n_layers=3))


def test_unknown_family_says_how_to_register(zoo) -> None:
    with pytest.raises(UnknownFamilyError, match="register_family"):
        get_spec("not_a_vlm")


def test_register_family_is_public_api(zoo) -> None:
    tiny = tiny_vlm("llava")
    tiny.model.config.model_type = "my_llava"
    with pytest.raises(UnknownFamilyError):
        vlm_probe.load(tiny)
    spec = dataclasses.replace(get_spec("llava"), name="my_llava", display_name="MyLLaVA", model_types=("my_llava",))
    registry = FamilyRegistry([spec])
    assert registry.get("my_llava") is spec
    vlm = vlm_probe.load(tiny, spec=spec)  # a spec without registering it
    assert vlm.spec.display_name == "MyLLaVA"
    register_family(spec)
    try:
        assert vlm_probe.load(tiny).spec is spec
        with pytest.raises(ValueError, match="already registered"):
            register_family(spec)
    finally:
        vlm_probe.arch.REGISTRY._specs.pop("my_llava")


def test_spec_that_does_not_match_fails_loudly(zoo) -> None:
    broken = dataclasses.replace(get_spec("qwen2_5_vl"), decoder_layers="model.language_model.blocks")
    with pytest.raises(SpecMismatchError, match="Qwen2.5-VL spec.*decoder layer list.*'blocks'"):
        vlm_probe.load(tiny_vlm("qwen2_5_vl"), spec=broken)


def test_layer_index_out_of_range(qwen) -> None:
    with pytest.raises(LayerIndexError, match="out of range: this model has 4"):
        qwen.layers[4]
    with pytest.raises(LayerIndexError):
        qwen.vision.blocks[10]
    assert qwen.layers[-1].index == 3


def test_path_with_no_config(tmp_path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        vlm_probe.load(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path, saved_qwen) -> None:
    (tmp_path / "config.json").write_text((saved_qwen / "config.json").read_text())
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
        vlm_probe.load(tmp_path)


def test_unknown_family_on_disk_fails_before_loading_weights(tmp_path, saved_qwen) -> None:
    config = json.loads((saved_qwen / "config.json").read_text())
    config["model_type"] = "qwen2"  # a text-only family
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownFamilyError, match="qwen2"):
        vlm_probe.load(tmp_path)


def test_image_placeholder_errors(qwen, zoo) -> None:
    image = zoo("qwen2_5_vl").image()
    with pytest.raises(InputError, match="1 image placeholder.*2 image"):
        qwen.prepare("<image> how many ?", images=[image, image])
    with pytest.raises(InputError, match="raw prompt has 0 image placeholder"):
        qwen.prepare("how many ?", images=[image], template="raw")
    with pytest.raises(InputError, match="no image was given"):
        qwen.prepare("<image> how many ?", template="raw")
    with pytest.raises(InputError, match="image item"):
        qwen.prepare([{"role": "user", "content": [{"type": "text", "text": "how many ?"}]}], images=[image])
    with pytest.raises(InputError, match="list of 2 entries"):
        qwen.prepare(["a", "b"], images=[image])


def test_mllama_image_positions_are_refused(zoo) -> None:
    vlm = vlm_probe.load(zoo("mllama"))
    assert [layer.is_cross_attention for layer in vlm.layers] == [False, True, False, True]
    with pytest.raises(NoOpInterventionError, match="cross-attention"):
        vlm.require_image_positions("patching the vision tokens")
