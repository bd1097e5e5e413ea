"""Executing merge plans: streamed into a live model (``splice``) or written to disk (``write_merge``).

Tensors are read one at a time from safetensors checkpoints and combined in float32, then
cast to the host's dtype. Nothing here builds a model: ``splice`` takes any ``torch.nn.Module``
whose parameter names are the module paths (an HF model, e.g. ``vlm.hf``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointMismatchError, InputError, MergePlanError
from ..io import atomic_directory, atomic_file, atomic_write_json, atomic_write_text
from .compare import NonFiniteWeightsWarning
from .plans import MergePlan, Rule
from .reader import Checkpoint, open_checkpoint
from .regions import Cuts
from .safetensors_stream import StreamWriter

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PROVENANCE = "vlm_probe_merge.json"


def open_all(checkpoints: Mapping[str, str | os.PathLike | Checkpoint]) -> dict[str, Checkpoint]:
    """Open every checkpoint of a plan (paths or already opened :class:`Checkpoint` objects)."""
    return {name: c if isinstance(c, Checkpoint) else open_checkpoint(c) for name, c in checkpoints.items()}


def validate(plan: MergePlan, checkpoints: Mapping[str, Checkpoint]) -> Cuts:
    """Refuse plans that cannot be executed, before anything is read or written.

    Checks the plan against the checkpoint names, and that every checkpoint the plan uses has
    the host's family, tensor names, shapes and dtypes (naming the first mismatch).
    """
    host = checkpoints.get(plan.host)
    plan.check(list(checkpoints), host.n_layers if host is not None else None)
    assert host is not None
    for name in plan.checkpoints_used():
        other = checkpoints[name]
        if other is host:
            continue
        if other.spec.name != host.spec.name:
            raise CheckpointMismatchError(
                f"{name} is a {other.spec.display_name} checkpoint but the host {plan.host} is "
                f"{host.spec.display_name}; a merge needs one architecture."
            )
        missing = sorted(set(host.tensors) ^ set(other.tensors))
        if missing:
            side = plan.host if missing[0] in host.tensors else name
            raise CheckpointMismatchError(
                f"{missing[0]} is in {side} but not in the other checkpoint ({len(missing)} tensors differ between "
                f"{plan.host} and {name})."
            )
        for key, entry in host.tensors.items():
            theirs = other.tensors[key]
            if theirs.shape != entry.shape:
                raise CheckpointMismatchError(f"{key} has shape {theirs.shape} in {name} but {entry.shape} in {plan.host}.")
            if theirs.dtype != entry.dtype:
                raise CheckpointMismatchError(f"{key} is {theirs.dtype} in {name} but {entry.dtype} in {plan.host}.")
    return Cuts.make(plan.cuts, host.n_layers)


def combine(rule: Rule | None, name: str, checkpoints: Mapping[str, Checkpoint], host: str) -> torch.Tensor | None:
    """The merged value of one tensor (stored dtype of the host), or None to keep the host's."""
    if rule is None:
        return None
    dtype = checkpoints[host].tensors[name].dtype
    if rule.method == "swap" or (rule.method == "linear" and rule.alpha == 1.0):
        return checkpoints[rule.source].tensor(name)
    if not dtype.is_floating_point:
        raise MergePlanError(f"{name} is {dtype}; only swap applies to integer tensors.")
    base = checkpoints[host].tensor(name).float()
    donor = checkpoints[rule.source].tensor(name).float()
    if rule.method == "linear":
        value = (1 - rule.alpha) * base + rule.alpha * donor
    else:
        reference = checkpoints[rule.base].tensor(name).float()  # type: ignore[index]
        value = base + rule.alpha * (donor - reference)
    return value.to(dtype)


@dataclass
class MergeSummary:
    """Which tensors a plan changed, by region and method."""

    plan: MergePlan
    changed: dict[str, str] = field(default_factory=dict)  #: tensor -> method
    n_tensors: int = 0

    def by_method(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for method in self.changed.values():
            out[method] = out.get(method, 0) + 1
        return out


def iter_plan(plan: MergePlan, checkpoints: Mapping[str, Checkpoint]) -> Iterator[tuple[str, Rule | None]]:
    """``(tensor name, deciding rule)`` for every host tensor, in storage order."""
    cuts = validate(plan, checkpoints)
    for name, entry in checkpoints[plan.host].tensors.items():
        yield name, plan.rule_for(entry.location, cuts)


# ----------------------------------------------------------------------------- in-memory splice


def _tied_groups(model: torch.nn.Module) -> dict[str, list[str]]:
    """Parameter names sharing storage (tied weights), keyed by each name."""
    by_ptr: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_ptr.setdefault(param.data_ptr(), []).append(name)
    return {name: names for names in by_ptr.values() for name in names if len(names) > 1}


@contextlib.contextmanager
def splice(
    model: torch.nn.Module,
    plan: MergePlan,
    checkpoints: Mapping[str, str | os.PathLike | Checkpoint],
    *,
    loaded: str | None = None,
    progress: bool = False,
) -> Iterator[MergeSummary]:
    """Load the plan's merged tensors into ``model`` for the block; restore the originals on exit.

    Tensors are streamed one at a time; only the replaced parameters' original values are kept
    (on their own device), and they are put back bit for bit on exit, exceptions included. The
    model must have the host checkpoint's architecture (parameter names are module paths).

    Args:
        loaded: the checkpoint whose weights ``model`` holds now (default: the plan's host).
            When it is not the host, every tensor no rule touches is read from the host, so
            ``splice(in_model, thirds_plan("RL:IN:IN"), ..., loaded="IN")`` gives RL's vision
            tower and head as the plan says; swaps from ``loaded`` itself are skipped.

    Example::

        with splice(vlm.hf, thirds_plan("IN:RL:RL"), {"IN": in_dir, "RL": rl_dir}):
            accuracy = evaluate(vlm, data)
    """
    opened = open_all(checkpoints)
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = _tied_groups(model)
    originals: dict[str, torch.Tensor] = {}
    saved: set[int] = set()
    summary = MergeSummary(plan)
    try:
        decided = list(iter_plan(plan, opened))
        summary.n_tensors = len(decided)
        for name, _ in decided:
            if name not in params:
                raise CheckpointMismatchError(f"The host checkpoint has {name} but the model has no such parameter; "
                                              "the model is not of the host's architecture.")
        if loaded is not None and loaded not in opened:
            raise MergePlanError(f"loaded={loaded!r} is not one of the checkpoints ({', '.join(opened)}).")
        if loaded is not None and loaded != plan.host:  # the host's own tensors must be read too
            from_host = Rule(("all",), plan.host)
            decided = [(name, rule or from_host) for name, rule in decided]
        if loaded is not None:  # a swap from the checkpoint the model holds changes nothing
            decided = [(name, None if rule is not None and rule.method == "swap" and rule.source == loaded else rule)
                       for name, rule in decided]
        rule_of = dict(decided)
        for name, group in tied.items():
            rules = {id(rule_of.get(n)) for n in group if n in rule_of}
            if len(rules) > 1:
                raise MergePlanError(f"{' and '.join(group)} are tied (one tensor) in this model, but the plan gives "
                                     "them different sources; put them in the same rule.")
        bar = tqdm(total=len(decided), desc=f"splice {plan.name or plan.host}", disable=not progress, unit="tensor")
        for name, rule in decided:
            value = combine(rule, name, opened, plan.host)
            if value is not None:
                param = params[name]
                if value.shape != param.shape:
                    raise CheckpointMismatchError(f"{name} has shape {tuple(value.shape)} in the checkpoint but "
                                                  f"{tuple(param.shape)} in the model.")
                if param.data_ptr() not in saved:  # tied parameters share one saved copy
                    originals[name] = param.detach().clone()
                    saved.add(param.data_ptr())
                with torch.no_grad():
                    param.copy_(value.to(param.device, param.dtype))
                summary.changed[name] = rule.method  # type: ignore[union-attr]
            bar.update(1)
        bar.close()
        yield summary
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)


# ----------------------------------------------------------------------------- writer


_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?)\s*(B|KB|MB|GB|KIB|MIB|GIB)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """``2GB``, ``500MB``, ``1GiB`` or a byte count -> bytes (:class:`InputError` otherwise)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        if not match:
            raise InputError(f"{what} {size!r} is not a size; use e.g. 2GB, 500MB or a number of bytes.")
        value = int(float(match[1]) * _UNITS[(match[2] or "B").upper()])
    if value < 1:
        raise InputError(f"{what} must be positive; got {size!r}.")
    return value




def _non_weight_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.iterdir()) if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)
            and p.name not in WEIGHT_INDEXES and p.name != PROVENANCE]


def write_merge(
    plan: MergePlan,
    checkpoints: Mapping[str, str | os.PathLike | Checkpoint],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    progress: bool = True,
) -> Path:
    """Write the merged checkpoint directory that ``transformers.from_pretrained`` and
    ``vlm_probe.load`` open.

    The directory holds sharded safetensors (the host's stored tensor names) with an index,
    the host's config, processor, tokenizer and other non-weight files, ``merge_plan.yaml`` and a
    provenance file. It is built under a temporary name and renamed into place; an existing
    ``out`` is refused unless ``overwrite=True``; ``out`` may never be (or lie inside) an input
    checkpoint. The plan is validated before anything is written, and the written index is
    checked to hold every host tensor. Shards are streamed: their layout is planned from the
    host's headers, and each tensor is written as it is computed, so memory holds one tensor
    (and the inputs it is combined from), not a shard.
    """
    limit = parse_size(max_shard_size)
    opened = open_all(checkpoints)
    decided = list(iter_plan(plan, opened))  # validates before any write
    host = opened[plan.host]
    out = Path(out).resolve()
    for name, ckpt in opened.items():
        source = ckpt.path.resolve()
        if out == source or source in out.parents:
            raise MergePlanError(f"Refusing to write the merge into the input checkpoint {name} ({source}); "
                                 "choose an output directory outside every input.")
    shards: list[list[tuple[str, Rule | None]]] = [[]]
    size = 0
    for name, rule in decided:  # the layout of every shard is known before any tensor is read
        nbytes = host.tensors[name].nbytes
        if size and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, rule))
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        weight_map: dict[str, str] = {}
        changed: dict[str, str] = {}
        nonfinite: list[str] = []
        bar = tqdm(total=len(decided), desc=f"writing {plan.name or 'merge'}", disable=not progress, unit="tensor")
        for file, shard in zip(names, shards):
            by_stored = {host.tensors[name].stored_name: (name, rule) for name, rule in shard}
            layout = {stored: (host.tensors[name].dtype, host.tensors[name].shape)
                      for stored, (name, _) in by_stored.items()}
            with atomic_file(tmp / file) as f:  # one tensor in memory at a time
                writer = StreamWriter(f, layout, metadata={"format": "pt"})
                for stored in writer.order:
                    name, rule = by_stored[stored]
                    value = combine(rule, name, opened, plan.host)
                    if value is None:
                        value = host.tensor(name)
                    else:
                        changed[name] = rule.method  # type: ignore[union-attr]
                    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        nonfinite.append(f"{name} has {int(torch.isnan(value).sum())} NaN and "
                                         f"{int(torch.isinf(value).sum())} Inf")
                    writer.write(stored, value)
                    weight_map[stored] = file
                    bar.update(1)
                writer.finish()
        bar.close()
        index = {"metadata": {"total_size": host.nbytes, "format": "pt"},
                 "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_json(tmp / "model.safetensors.index.json", index)
        for file in _non_weight_files(host.path):
            shutil.copy2(file, tmp / file.name)
        atomic_write_text(tmp / "merge_plan.yaml", plan.to_yaml())
        atomic_write_json(tmp / PROVENANCE, {
            "plan": plan.to_dict(),
            "checkpoints": {name: str(c.path) for name, c in opened.items()},
            "changed_tensors": len(changed),
            "methods": {m: sum(1 for v in changed.values() if v == m) for m in set(changed.values())},
            "vlm_probe": _version(),
        })
        _verify_written(tmp, host)
    if nonfinite:
        warnings.warn(
            f"The merge in {out} holds NaN or Inf in {len(nonfinite)} tensor(s) (from its inputs): "
            f"{'; '.join(nonfinite[:3])}. A model loaded from it gives NaN outputs; check the inputs with "
            "vlm-probe weights.", NonFiniteWeightsWarning, stacklevel=2)
    return out


def _verify_written(directory: Path, host: Checkpoint) -> None:
    """The written checkpoint must hold every host tensor with its shape (a merge that silently
    drops tensors would load with random weights)."""
    written = open_checkpoint(directory)
    missing = sorted(set(host.tensors) - set(written.tensors))
    if missing:
        raise MergePlanError(f"The written merge lacks {len(missing)} tensors (e.g. {missing[:3]}); nothing was kept.")
    for name, entry in host.tensors.items():
        if written.tensors[name].shape != entry.shape:
            raise MergePlanError(f"The written merge has {name} with shape {written.tensors[name].shape}, "
                                 f"expected {entry.shape}.")


def _version() -> str:
    from .. import __version__

    return __version__


def read_provenance(directory: str | os.PathLike) -> dict[str, Any]:
    """The provenance record of a merge written by :func:`write_merge`."""
    return json.loads((Path(directory) / PROVENANCE).read_text())
