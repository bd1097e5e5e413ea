"""Writing a safetensors file one tensor at a time: memory holds one tensor, not the file.

The layout (names, dtypes, shapes) is fixed before any data, so the header goes first and each
tensor's raw bytes are appended as the caller computes it, in :attr:`StreamWriter.order`. That
order is safetensors' own (dtype descending in its ``Dtype`` enum, i.e. by alignment, then name),
so every tensor starts aligned and the file is byte-identical to ``safetensors.torch.save`` of
the same tensors and metadata.

    with open(path, "wb") as f:
        writer = StreamWriter(f, {"w": (torch.bfloat16, (4, 4))}, metadata={"format": "pt"})
        for name in writer.order:
            writer.write(name, compute(name))
        writer.finish()
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from typing import BinaryIO

import torch

from ..errors import MergePlanError

#: safetensors dtype codes, in the order of its ``Dtype`` enum (files store tensors by it, descending)
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {dtype: i for i, dtype in enumerate(DTYPE_CODES)}

#: name -> (dtype, shape) of every tensor of a file
Layout = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]


class StreamWriter:
    """Writes the header of ``layout`` to ``file`` now, then one tensor per :meth:`write`.

    Tensors must come in :attr:`order` with their planned dtype and shape
    (:class:`~vlm_probe.errors.MergePlanError` naming the tensor otherwise, before its bytes are
    written); :meth:`finish` checks that all came and that the file has the planned size.
    """

    def __init__(self, file: BinaryIO, layout: Layout, metadata: Mapping[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise NotImplementedError("safetensors stores little-endian bytes; this writer needs a little-endian host.")
        unknown = {str(dtype) for dtype, _ in layout.values() if dtype not in _RANK}
        if unknown:
            raise MergePlanError(f"safetensors has no code for {', '.join(sorted(unknown))}.")
        self.order: list[str] = sorted(layout, key=lambda name: (-_RANK[layout[name][0]], name))
        header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
        offset = 0
        for name in self.order:
            dtype, shape = layout[name]
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.size = 8 + len(text) + offset  #: bytes of the finished file
        self._file, self._layout, self._written = file, layout, 0
        self._start = file.tell()
        file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes; it must be ``order[i]`` for the i-th call."""
        expected = self.order[self._written] if self._written < len(self.order) else None
        if name != expected:
            raise MergePlanError(f"{name} was written out of order; the file's next tensor is {expected}.")
        dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise MergePlanError(f"{name} came out as {tensor.dtype} {tuple(tensor.shape)} but the file's header "
                                 f"plans {dtype} {tuple(shape)}.")
        self._file.write(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())
        self._written += 1

    def finish(self) -> None:
        """Check that every planned tensor was written and the file has its planned size."""
        if self._written != len(self.order):
            raise MergePlanError(f"{len(self.order) - self._written} tensors were never written "
                                 f"(first: {self.order[self._written]}).")
        size = self._file.tell() - self._start
        if size != self.size:
            raise MergePlanError(f"The safetensors file holds {size} bytes but its header plans {self.size}.")
