"""Streaming checkpoint reader: tensor metadata from safetensors headers, data read on demand.

:func:`open_checkpoint` reads ``config.json`` (to find the family spec) and the header of every
safetensors shard (names, dtypes, shapes, byte offsets); no tensor data is read. Data is read
later, one tensor (or one slice of a tensor) at a time, with positional reads into buffers the
caller owns: no file stays memory-mapped, so a reader's resident memory is its buffers, not
the checkpoint (a checkpoint kept mapped counts its touched pages in RSS).

Every stored name is mapped to its module path (:meth:`FamilySpec.module_path`, so transformers
4 and 5 namings give the same rows) and placed on the unified layer index
(:meth:`FamilySpec.locate`): vision blocks negative, projector 0, LLM decoder layers 1..N.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import FamilySpec, Location, Region, get_spec
from ..arch.regions import vision_depths_from_names
from ..errors import CheckpointError, CorruptCheckpointError, MissingShardError, UnsafeCheckpointError

__all__ = [
    "Checkpoint",
    "CorruptCheckpointError",
    "MissingShardError",
    "TensorEntry",
    "open_checkpoint",
    "resolve_checkpoint_dir",
]


#: safetensors dtype codes -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NUMBERED_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")
_MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: where its bytes are and where it sits in the model."""

    name: str  #: module-path name (the same for transformers 4 and 5 checkpoints)
    stored_name: str  #: name as stored in the file
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  #: absolute byte offset of the data in ``file`` (safetensors); -1 for pickle files
    location: Location

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the tensor viewed as a matrix: dim 0 by the product of the rest."""
        if not self.shape:
            return (1, 1)
        return (self.shape[0], math.prod(self.shape[1:]))


@dataclass
class Checkpoint:
    """A checkpoint directory opened for streaming: config, family spec and tensor entries.

    Build it with :func:`open_checkpoint`. ``tensors`` maps module-path names to entries,
    in storage order (file, then offset), which is the order a sequential read follows.
    """

    path: Path
    config: dict[str, Any]
    spec: FamilySpec
    tensors: dict[str, TensorEntry]
    format: str  #: "safetensors" or "pickle"
    vision_depths: tuple[int, ...]
    n_layers: int  #: LLM decoder layers found in the checkpoint
    _pickle_cache: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[Path]:
        return sorted({entry.file for entry in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorEntry:
        return self.tensors[name]

    def reader(self, entry: TensorEntry) -> TensorReader:
        """A context manager that holds ``entry``'s file open while slices of it are read."""
        return TensorReader(self, entry)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one whole tensor (stored dtype and shape). For slices, use :meth:`reader`."""
        entry = self.tensors[name]
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
        with self.reader(entry) as reader:
            flat = reader.read(0, entry.numel, out)
        return flat.reshape(entry.shape)

    def __repr__(self) -> str:
        return (
            f"Checkpoint({str(self.path)!r}, family={self.spec.name}, tensors={len(self.tensors)}, "
            f"{self.nbytes / 2**30:.2f} GiB, format={self.format})"
        )


class TensorReader:
    """Reads element ranges of one tensor into caller-owned byte buffers (positional reads)."""

    def __init__(self, checkpoint: Checkpoint, entry: TensorEntry) -> None:
        self.checkpoint = checkpoint
        self.entry = entry
        self._fd: int | None = None
        self._tensor: torch.Tensor | None = None

    def __enter__(self) -> TensorReader:
        if self.checkpoint.format == "safetensors":
            try:
                self._fd = os.open(self.entry.file, os.O_RDONLY)
            except OSError as error:
                raise MissingShardError(
                    f"Cannot open {self.entry.file} (holding {self.entry.stored_name}): {error.strerror}. "
                    "Was the checkpoint moved or deleted while being read?"
                ) from error
            if hasattr(os, "posix_fadvise"):  # larger kernel read-ahead; start reading this tensor now
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                os.posix_fadvise(self._fd, self.entry.offset, self.entry.nbytes, os.POSIX_FADV_WILLNEED)
        else:
            self._tensor = _pickle_tensor(self.checkpoint, self.entry).reshape(-1)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tensor = None

    def read(self, start: int, count: int, buffer: torch.Tensor) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor, stored dtype.

        Args:
            start: first element.
            count: number of elements.
            buffer: uint8 tensor of at least ``count * itemsize`` bytes; the result is a view of it.

        Returns:
            A 1-D tensor of ``count`` elements (stored dtype) sharing ``buffer``'s memory.
        """
        entry = self.entry
        size = count * entry.itemsize
        if buffer.numel() < size:
            raise ValueError(f"buffer of {buffer.numel()} bytes is too small for {size} bytes.")
        target = buffer[:size]
        if self._tensor is not None:
            target.view(entry.dtype).copy_(self._tensor[start:start + count])
            return target.view(entry.dtype)
        if self._fd is None:
            raise RuntimeError("TensorReader.read() outside its 'with' block.")
        view = memoryview(target.numpy())
        done = 0
        position = entry.offset + start * entry.itemsize
        while done < size:
            got = os.preadv(self._fd, [view[done:]], position + done)
            if got == 0:
                raise CorruptCheckpointError(
                    f"{entry.file} ends before the data of {entry.stored_name} does: the file is truncated."
                )
            done += got
        return target.view(entry.dtype)


# ----------------------------------------------------------------------------- opening


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint directory from a local path, a hub cache repo folder, or a cached hub id.

    Accepts a directory with ``config.json``, a hub cache folder ``models--org--name`` (its
    ``refs/main`` snapshot), or ``org/name`` already present in the local hub cache. Never
    downloads.
    """
    given = Path(os.fspath(path)).expanduser()
    if given.is_dir():
        if given.name.startswith("models--") and (given / "snapshots").is_dir():
            return _cache_snapshot(given)
        return given
    if given.exists():
        raise CheckpointError(f"{given} is a file; pass the checkpoint directory that holds config.json.")
    text = os.fspath(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
            HF_HUB_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")
        repo = Path(HF_HUB_CACHE) / ("models--" + text.replace("/", "--"))
        if repo.is_dir():
            return _cache_snapshot(repo)
        raise CheckpointError(
            f"{text!r} is neither an existing local directory nor a model in the hub cache ({HF_HUB_CACHE}). "
            f"Check the path; weight comparison never downloads, so fetch hub models first "
            f"(e.g. `hf download {text}`)."
        )
    raise CheckpointError(f"Checkpoint directory {given} does not exist.")


def _cache_snapshot(repo: Path) -> Path:
    ref = repo / "refs" / "main"
    snapshots = repo / "snapshots"
    if ref.is_file():
        snapshot = snapshots / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    found = sorted(p for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    if len(found) == 1:
        return found[0]
    raise CheckpointError(
        f"Hub cache folder {repo} has {len(found)} snapshots and no usable refs/main; pass the snapshot "
        "directory (snapshots/<commit>) itself."
    )


def open_checkpoint(
    path: str | os.PathLike | Checkpoint,
    *,
    allow_pickle: bool = False,
    spec: FamilySpec | None = None,
) -> Checkpoint:
    """Open a checkpoint directory for streaming (reads config and headers, no tensor data).

    Args:
        path: checkpoint directory, hub cache folder, or cached hub id (see
            :func:`resolve_checkpoint_dir`); an open :class:`Checkpoint` is returned as is.
        allow_pickle: accept a checkpoint stored only as pickle files (``.bin``, ``.pt``); pickle
            can run arbitrary code on load, so this is off unless the caller trusts the source.
        spec: family spec to use instead of the one registered for ``config.json``'s ``model_type``.

    Raises:
        CheckpointError: no such directory, no ``config.json``, or no weights.
        MissingShardError: the index (or shard numbering) names files that are not there.
        CorruptCheckpointError: a header or index that does not match the files.
        UnsafeCheckpointError: only pickle files and ``allow_pickle`` is False.
        UnknownFamilyError: a ``model_type`` without a registered family spec.
    """
    if isinstance(path, Checkpoint):
        return path
    directory = resolve_checkpoint_dir(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{directory} has no config.json, so its model family is unknown. Pass the directory that "
            "save_pretrained() wrote (it holds config.json next to the weights)."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{config_file} is not valid JSON: {error}.") from error
    if spec is None:
        model_type = config.get("model_type")
        if not model_type:
            raise CheckpointError(f"{config_file} has no model_type; pass spec=... to name the family.")
        spec = get_spec(model_type)
    stored = _safetensors_entries(directory)
    fmt = "safetensors"
    if stored is None:
        stored = _pickle_entries(directory, allow_pickle)
        fmt = "pickle"
    return _build(directory, config, spec, stored, fmt)


# (stored_name, file, dtype, shape, offset)
_Stored = tuple[str, Path, torch.dtype, tuple[int, ...], int]


def _safetensors_entries(directory: Path) -> list[_Stored] | None:
    index_file = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CorruptCheckpointError(f"{index_file} is not a safetensors index (no weight_map): {error}.") from error
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise MissingShardError(
                f"{index_file.name} in {directory} names {len(missing)} shard file(s) that are not there: "
                f"{', '.join(missing[:5])}. Download or copy the missing shards (or fix the index)."
            )
        entries: list[_Stored] = []
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file in files:
            header = _read_header(directory / file)
            absent = [name for name in by_file[file] if name not in header]
            if absent:
                raise CorruptCheckpointError(
                    f"{index_file.name} maps {len(absent)} tensor(s) to {file}, which does not hold them "
                    f"(e.g. {', '.join(absent[:3])}). The index and the shards come from different saves."
                )
            entries += [header[name] for name in by_file[file]]
        return entries
    if single.is_file():
        return list(_read_header(single).values())
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        return None
    numbered = [_NUMBERED_SHARD.match(p.name) for p in shards]
    if all(numbered):
        groups = {(m["stem"], int(m["n"])) for m in numbered if m}
        if len(groups) == 1:
            stem, total = groups.pop()
            present = {int(m["i"]) for m in numbered if m}
            absent = [f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1) if i not in present]
            if absent:
                raise MissingShardError(
                    f"{directory} holds {len(present)} of {total} shards and no index; missing: "
                    f"{', '.join(absent[:5])}."
                )
    entries = []
    seen: dict[str, Path] = {}
    for shard in shards:
        for name, item in _read_header(shard).items():
            if name in seen:
                raise CorruptCheckpointError(
                    f"{name} is stored in both {seen[name].name} and {shard.name} and there is no index to say "
                    "which one counts; remove the stray file."
                )
            seen[name] = shard
            entries.append(item)
    return entries


def _read_header(file: Path) -> dict[str, _Stored]:
    """Parse a safetensors header: name -> (name, file, dtype, shape, absolute offset)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"{file} is too short to be a safetensors file.")
        (length,) = struct.unpack("<Q", raw)
        if length > _MAX_HEADER_BYTES or 8 + length > size:
            raise CorruptCheckpointError(f"{file} has an invalid safetensors header length ({length} bytes).")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CorruptCheckpointError(f"{file} has an unreadable safetensors header: {error}.") from error
    header.pop("__metadata__", None)
    data_start = 8 + length
    out: dict[str, _Stored] = {}
    for name, info in header.items():
        code = info.get("dtype")
        if code not in SAFETENSORS_DTYPES:
            raise CorruptCheckpointError(f"{file}: tensor {name} has unsupported dtype {code!r}.")
        dtype = SAFETENSORS_DTYPES[code]
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize or data_start + end > size:
            raise CorruptCheckpointError(
                f"{file}: tensor {name} ({code} {list(shape)}) has data offsets {begin}..{end} that do not fit "
                f"its shape or the file size ({size} bytes); the file is truncated or damaged."
            )
        out[name] = (name, file, dtype, shape, data_start + begin)
    return out


def _pickle_entries(directory: Path, allow_pickle: bool) -> list[_Stored]:
    index_file = directory / "pytorch_model.bin.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(p for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if not files:
        raise CheckpointError(
            f"{directory} has no weights: no model.safetensors, no model.safetensors.index.json and no other "
            "*.safetensors files."
        )
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"{directory} holds only pickle weights ({', '.join(p.name for p in files[:3])}). Loading pickle "
            "can run arbitrary code. Convert the checkpoint to safetensors, or pass allow_pickle=True "
            "(CLI: --allow-pickle) if you trust its source."
        )
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise MissingShardError(f"{index_file.name} names shard files that are not there: {', '.join(missing[:5])}.")
    entries: list[_Stored] = []
    for file in files:
        state = _torch_load(file)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                entries.append((name, file, value.dtype, tuple(value.shape), -1))
        del state
    return entries


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{file} does not hold a state dict (got {type(state).__name__}).")
    return state


def _pickle_tensor(checkpoint: Checkpoint, entry: TensorEntry) -> torch.Tensor:
    cache = checkpoint._pickle_cache
    if entry.file not in cache:
        cache.clear()  # one shard at a time
        cache[entry.file] = _torch_load(entry.file)
    return cache[entry.file][entry.stored_name]


def _build(directory: Path, config: dict[str, Any], spec: FamilySpec, stored: list[_Stored], fmt: str) -> Checkpoint:
    paths = {item[0]: spec.module_path(item[0]) for item in stored}
    clashes: dict[str, list[str]] = {}
    for stored_name, path in paths.items():
        clashes.setdefault(path, []).append(stored_name)
    doubled = {path: names for path, names in clashes.items() if len(names) > 1}
    if doubled:
        path, names = next(iter(doubled.items()))
        raise CorruptCheckpointError(
            f"{directory}: stored tensors {names} all map to {path} (mixed transformers-4 and -5 names in one "
            "checkpoint); keep one copy."
        )
    depths = vision_depths_from_names(spec, paths.values())
    order = sorted(stored, key=lambda item: (str(item[1]), item[4], item[0]))
    tensors: dict[str, TensorEntry] = {}
    for stored_name, file, dtype, shape, offset in order:
        path = paths[stored_name]
        tensors[path] = TensorEntry(path, stored_name, file, dtype, shape, offset, spec.locate(path, depths))
    layers = [e.location.layer for e in tensors.values() if e.location.region is Region.LLM]
    n_layers = max(layers) if layers else 0
    return Checkpoint(directory, config, spec, tensors, fmt, depths, n_layers)
