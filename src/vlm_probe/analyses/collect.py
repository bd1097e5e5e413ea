"""Collecting residual-stream activations for a dataset, in memory or in a disk cache.

``collect`` runs batches through one or more checkpoints and keeps, for every checkpoint,
site, layer and token group, the activations of that group's tokens (``reduce="none"``: one
row per token) or their mean per sample (``reduce="mean"``). With ``out=`` every batch is
written as a safetensors shard next to an ``index.json``; memory stays bounded by one batch,
and a killed collection resumes from the shards already written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, UnknownKeyError
from ..interventions import sites as S
from ..interventions.positions import resolve_positions
from ..io import atomic_write_bytes, atomic_write_json
from ..model.inputs import Batch

INDEX = "index.json"


def _key(checkpoint: str, site: str, layer: int, group: str) -> str:
    return f"{checkpoint}|{site}|{layer}|{group}"


@dataclass
class Activations:
    """Collected activations: ``acts[(checkpoint, site, layer, group)]`` -> ``[rows, d_model]``.

    ``acts.sample_index(key)`` gives each row's sample index (``acts.position_index(key)`` its
    token position; -1 for means). Read from a disk cache, an entry is loaded from the shards
    when asked for and not kept, so memory holds one entry at a time.
    """

    tensors: dict[str, Tensor] = field(default_factory=dict)
    samples: dict[str, Tensor] = field(default_factory=dict)
    positions: dict[str, Tensor] = field(default_factory=dict)
    files: dict[str, list[Path]] = field(default_factory=dict)  #: key -> disk-cache shards holding it

    def _part(self, key: tuple[str, str, int, str], part: str) -> Tensor:
        name = _key(*key)
        store = {"acts": self.tensors, "samples": self.samples, "positions": self.positions}[part]
        if name in store:
            return store[name]
        if name in self.files:
            pieces = []
            for file in self.files[name]:
                with safe_open(file, framework="pt") as shard:
                    pieces.append(shard.get_tensor(f"{name}#{part}"))
            return torch.cat(pieces)
        raise UnknownKeyError(f"No activations for {key}; collected: {self.keys()[:6]} ...")

    def __getitem__(self, key: tuple[str, str, int, str]) -> Tensor:
        return self._part(key, "acts")

    def sample_index(self, key: tuple[str, str, int, str]) -> Tensor:
        return self._part(key, "samples")

    def position_index(self, key: tuple[str, str, int, str]) -> Tensor:
        return self._part(key, "positions")

    def keys(self) -> list[tuple[str, str, int, str]]:
        out = []
        for k in [*self.tensors, *(k for k in self.files if k not in self.tensors)]:
            c, s, l, g = k.split("|")
            out.append((c, s, int(l), g))
        return out

    def layers(self, checkpoint: str, site: str, group: str) -> list[int]:
        return sorted(l for c, s, l, g in self.keys() if (c, s, g) == (checkpoint, site, group))

    def add(self, key: str, acts: Tensor, samples: Tensor, positions: Tensor) -> None:
        if key in self.tensors:
            self.tensors[key] = torch.cat([self.tensors[key], acts])
            self.samples[key] = torch.cat([self.samples[key], samples])
            self.positions[key] = torch.cat([self.positions[key], positions])
        else:
            self.tensors[key], self.samples[key], self.positions[key] = acts, samples, positions

    @classmethod
    def load(cls, directory: str | os.PathLike, *, lazy: bool = True) -> Activations:
        """Open a disk cache written by :func:`collect`: lazily (entries read from the shards
        on access) or, with ``lazy=False``, every shard into memory."""
        directory = Path(directory)
        if not (directory / INDEX).is_file():
            what = "does not exist" if not directory.exists() else f"has no {INDEX}"
            raise InputError(f"{directory} {what}, so it is not an activation cache; pass the cache_dir that "
                             "collect() wrote.")
        index = _read_index(directory)
        acts = cls()
        for shard in sorted(index["shards"], key=lambda s: (s["checkpoint"], s["batch"])):  # rows in sample order
            file = directory / shard["file"]
            if lazy:
                with safe_open(file, framework="pt") as handle:
                    names = sorted({k.rsplit("#", 1)[0] for k in handle.keys()})
                for name in names:
                    acts.files.setdefault(name, []).append(file)
                continue
            data = load_file(file)
            for key in sorted({k.rsplit("#", 1)[0] for k in data}):
                acts.add(key, data[f"{key}#acts"], data[f"{key}#samples"], data[f"{key}#positions"])
        return acts


def _read_index(directory: Path) -> dict[str, Any]:
    file = directory / INDEX
    if not file.is_file():
        return {"shards": [], "config": None}
    return json.loads(file.read_text())


def _batches(data: Batch | Iterable[Batch], batch_size: int) -> list[Batch]:
    if isinstance(data, Batch):
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    return list(data)


def collect(
    models: Any,
    data: Batch | Iterable[Batch],
    *,
    sites: Sequence[str] = ("layer_out",),
    layers: Sequence[int] | None = None,
    groups: Sequence[str] = ("vision", "question", "last"),
    reduce: str = "none",
    batch_size: int = 16,
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> Activations:
    """Collect activations of token groups through one or more checkpoints.

    Args:
        models: a VLM or a mapping name -> VLM (e.g. a checkpoint set).
        data: a batch (split into ``batch_size`` chunks) or an iterable of batches; sample
            indices count across all of them.
        sites: registered sites (``layer_out``, ``layer_in``, ``attn_out``, ``mlp_out``, ...,
            ``embed``, ``final_norm``; ``vision_out``/``vision_in`` and ``projector`` are kept as
            one row per patch or image token under the group ``"all"``).
        layers: 0-based decoder layers or vision blocks (default all; negative ones count from the end).
        groups: token groups (layout groups, or ``"all"``).
        reduce: ``"none"`` (one row per token) or ``"mean"`` (one row per sample).
        out: a directory for the disk cache (resumable); ``None`` keeps everything in memory.

    Returns:
        :class:`Activations` (the cache opened lazily when ``out`` is given: entries are
        read from disk when asked for).
    """
    if reduce not in ("none", "mean"):
        raise InputError(f"reduce must be 'none' or 'mean'; got {reduce!r}.")
    for site in sites:
        S.check_site(site)
    named = dict(models) if isinstance(models, Mapping) or hasattr(models, "items") else {"model": models}
    batches = _batches(data, batch_size)
    config = {"checkpoints": list(named), "sites": list(sites), "groups": list(groups), "reduce": reduce,
              "layers": None if layers is None else list(layers), "n_batches": len(batches)}
    directory = Path(out) if out is not None else None
    index = {"shards": [], "config": config}
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        existing = _read_index(directory)
        if existing["config"] not in (None, config):
            raise InputError(
                f"{directory} holds a collection with other settings ({existing['config']}); use another directory."
            )
        index = {**existing, "config": config}
    done = {(s["checkpoint"], s["batch"]) for s in index["shards"]}
    memory = Activations()
    total = len(named) * len(batches)
    bar = tqdm(total=total, desc="collecting", unit="batch", disable=not progress)
    for name, vlm in named.items():
        offset = 0
        for b, batch in enumerate(batches):
            if (name, b) in done:
                offset += len(batch)
                bar.update(1)
                continue
            shard = _collect_batch(vlm, name, batch, sites, layers, groups, reduce, offset)
            offset += len(batch)
            if directory is None:
                for key, (acts, samples, positions) in shard.items():
                    memory.add(key, acts, samples, positions)
            else:
                file = f"{name}-{b:05d}.safetensors"
                tensors = {}
                for key, (acts, samples, positions) in shard.items():
                    tensors.update({f"{key}#acts": acts.contiguous(), f"{key}#samples": samples,
                                    f"{key}#positions": positions})
                atomic_write_bytes(directory / file, save(tensors))
                index["shards"].append({"checkpoint": name, "batch": b, "file": file})
                atomic_write_json(directory / INDEX, index)
            bar.update(1)
    bar.close()
    return Activations.load(directory) if directory is not None else memory


def _collect_batch(
    vlm: Any, name: str, batch: Batch, sites: Sequence[str], layers: Sequence[int] | None, groups: Sequence[str],
    reduce: str, offset: int,
) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    pairs = [(site, index) for site in sites for index in S.indices(vlm, site, layers if S.site(site).indexed else None)]
    token_groups = [g for g in groups if g != "all"] + (["all"] if "all" in groups else [])
    masks = {g: resolve_positions(batch, g, vlm=vlm, what=f"collecting {g!r}") for g in token_groups}
    with torch.no_grad(), vlm.trace(use_cache=False) as tracer:
        with tracer.invoke(batch):
            pass
        saved = S.read_many(vlm, tracer, pairs)
    out: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
    for (site, layer), act in zip(pairs, saved):
        act = act.detach().float().cpu()
        if not S.site(site).tokens:  # vision tower / projector: one row per unit, group "all"
            out[_key(name, site, layer, "all")] = _units(vlm, batch, act, reduce, offset)
            continue
        for group, mask in masks.items():
            rows, cols = torch.nonzero(mask, as_tuple=True)
            if reduce == "none":
                values, samples, positions = act[rows, cols], rows + offset, cols
            else:
                counts = mask.sum(1)
                keep = counts > 0
                sums = torch.zeros(len(batch), act.shape[-1]).index_add_(0, rows, act[rows, cols])
                values = (sums / counts.clamp_min(1)[:, None])[keep]
                samples = torch.arange(len(batch))[keep] + offset
                positions = torch.full((int(keep.sum()),), -1)
            out[_key(name, site, layer, group)] = (values, samples.long(), positions.long())
    return out


def _units(vlm: Any, batch: Batch, act: Tensor, reduce: str, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """A vision-tower or projector activation as rows: its units (patches or image tokens),
    each with its sample and its index among that sample's units (``-1`` for means)."""
    counts = vlm.vision_row_units(batch, act.shape[0])
    flat = act.reshape(act.shape[0], -1, act.shape[-1])  # [units, tokens per unit, dim]
    per_sample = flat.split(counts)
    if reduce == "mean":
        keep = [i for i, c in enumerate(counts) if c]
        values = torch.stack([per_sample[i].reshape(-1, act.shape[-1]).mean(0) for i in keep])
        return values, torch.tensor(keep) + offset, torch.full((len(keep),), -1)
    rows = [part.reshape(-1, act.shape[-1]) for part in per_sample]
    samples = torch.cat([torch.full((len(r),), i + offset) for i, r in enumerate(rows)])
    positions = torch.cat([torch.arange(len(r)) for r in rows])
    return torch.cat(rows), samples.long(), positions.long()
