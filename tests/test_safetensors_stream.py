"""The streaming safetensors writer: files safetensors reads back exactly, byte-identical to its own save."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from vlm_probe.errors import MergePlanError
from vlm_probe.weights.safetensors_stream import StreamWriter


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "b.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),  # odd byte count before wider dtypes
        "a.f16": torch.randn(7, generator=g).half(),
        "f32": torch.randn(2, 3, 4, generator=g),
        "scalar.f32": torch.tensor(1.5),
        "empty.f32": torch.empty(0, 3),
        "i64": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "mask": torch.rand(9, generator=g) > 0.5,
        "empty.bool": torch.empty(0, dtype=torch.bool),
        "u8": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
    }


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    with open(path, "wb") as f:
        writer = StreamWriter(f, {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}, metadata)
        for name in writer.order:
            writer.write(name, tensors[name])
        writer.finish()
    assert path.stat().st_size == writer.size


@pytest.mark.parametrize("metadata", [{"format": "pt"}, None])
def test_written_file_reloads_exactly_and_equals_safetensors_save(tmp_path, metadata) -> None:
    tensors = _tensors()
    path = tmp_path / "x.safetensors"
    _write(path, tensors, metadata)
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == metadata
        assert torch.equal(f.get_tensor("i64"), tensors["i64"])
    assert path.read_bytes() == save(tensors, metadata=metadata), "same order, header and padding as safetensors"


def test_wrong_tensor_order_or_count_is_refused_naming_it(tmp_path) -> None:
    layout = {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}
    with open(tmp_path / "x", "wb") as f:
        writer = StreamWriter(f, layout)
        assert writer.order == ["a", "b"]
        with pytest.raises(MergePlanError, match="b was written out of order"):
            writer.write("b", torch.zeros(2))
        with pytest.raises(MergePlanError, match=r"a came out as torch.bfloat16 \(2,\)"):
            writer.write("a", torch.zeros(2, dtype=torch.bfloat16))
        with pytest.raises(MergePlanError, match=r"a came out as torch.float32 \(3,\)"):
            writer.write("a", torch.zeros(3))
        writer.write("a", torch.zeros(2))
        with pytest.raises(MergePlanError, match="first: b"):
            writer.finish()
