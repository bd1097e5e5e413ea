"""compare_weights(): stream a chain of checkpoints once and tabulate what each step changed.

    result = compare_weights({"Base": base_dir, "IN": in_dir, "RL": rl_dir}, cuts=(8, 20))
    result.by_region()          # energy share, relative norm, cosine IN-update vs RL-update
    result.plot()               # per-layer curves, shares by region, spectra by component

Every tensor is read once, chunk by chunk, from all checkpoints together (memory: a few
chunks, whatever the model size); exact spectra re-read the tensor right after its norms, while
its pages are still in the OS cache, into one float64 Gram matrix per step, diagonalised with the
other steps (and on a GPU other tensors) of the same Gram size.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import CheckpointMismatchError, InputError
from .deltas import NormKernel, TensorNorms, finish_norms
from .reader import Checkpoint, TensorEntry, open_checkpoint
from .regions import Cuts, layer_label, region_of
from .result import WeightComparison
from .spectra import GramSpectra, SVDConfig, Spectrum, delta_spectrum, overlaps, spectral_metrics
from .streaming import stream

__all__ = ["NonFiniteWeightsWarning", "compare_weights", "open_checkpoints"]


class NonFiniteWeightsWarning(UserWarning):
    """Some tensors hold NaN or Inf; their rows are flagged and left out of every aggregate."""


PathLike = str | os.PathLike | Checkpoint


def open_checkpoints(checkpoints: Mapping[str, PathLike], *, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Open named checkpoints (see :func:`~vlm_probe.weights.open_checkpoint`) and check they share one family."""
    if not isinstance(checkpoints, Mapping):
        raise InputError(
            "checkpoints must be a mapping of names to directories, e.g. {'Base': ..., 'IN': ..., 'RL': ...}."
        )
    if len(checkpoints) < 2:
        raise InputError(f"Comparing weights needs at least two checkpoints, got {len(checkpoints)}.")
    opened = {str(name): open_checkpoint(path, allow_pickle=allow_pickle) for name, path in checkpoints.items()}
    names = list(opened)
    ref = opened[names[0]]
    for name in names[1:]:
        if opened[name].spec.name != ref.spec.name:
            raise CheckpointMismatchError(
                f"{name} ({opened[name].path}) is a {opened[name].spec.display_name} checkpoint but {names[0]} "
                f"({ref.path}) is {ref.spec.display_name}; weight deltas need one architecture."
            )
    return opened


def _check_tensors(opened: Mapping[str, Checkpoint], names: Sequence[str]) -> None:
    ckpt_names = list(opened)
    ref_name = ckpt_names[0]
    ref = opened[ref_name]
    wanted = set(names)
    for other_name in ckpt_names[1:]:
        other = opened[other_name]
        mine = {n for n in other.tensors if n in wanted or n not in ref.tensors}
        only_ref = sorted(wanted - set(other.tensors))
        only_other = sorted(mine - set(ref.tensors))
        if only_ref or only_other:
            parts = []
            if only_ref:
                parts.append(f"only in {ref_name}: {', '.join(only_ref[:5])}" + (" ..." if len(only_ref) > 5 else ""))
            if only_other:
                parts.append(
                    f"only in {other_name}: {', '.join(only_other[:5])}" + (" ..." if len(only_other) > 5 else "")
                )
            raise CheckpointMismatchError(
                f"{ref_name} and {other_name} hold different tensors ({'; '.join(parts)}). Pass include=... to "
                "compare the tensors they share."
            )
        bad = [
            f"{n}: {ref_name} {list(ref.tensors[n].shape)} vs {other_name} {list(other.tensors[n].shape)}"
            for n in names
            if ref.tensors[n].shape != other.tensors[n].shape
        ]
        if bad:
            raise CheckpointMismatchError(
                f"{len(bad)} tensor(s) differ in shape between {ref_name} and {other_name}: {'; '.join(bad[:5])}"
                + (" ..." if len(bad) > 5 else "")
                + ". Pass include=... to leave them out (e.g. a resized vocabulary)."
            )


def _resolve_steps(names: Sequence[str], steps: Sequence[tuple[str, str]] | None) -> list[tuple[int, int]]:
    if steps is None:
        return [(i, i + 1) for i in range(len(names) - 1)]
    index = {name: i for i, name in enumerate(names)}
    out = []
    for step in steps:
        if len(step) != 2 or step[0] not in index or step[1] not in index or step[0] == step[1]:
            raise InputError(f"Each step must be a pair of two different checkpoint names from {list(names)}, got {step!r}.")
        out.append((index[step[0]], index[step[1]]))
    if not out:
        raise InputError("steps is empty.")
    return out


def compare_weights(
    checkpoints: Mapping[str, PathLike],
    *,
    steps: Sequence[tuple[str, str]] | None = None,
    cuts: Sequence[int] | str | None = None,
    svd: str | SVDConfig = "auto",
    top_k: int = 50,
    include: str | None = None,
    allow_pickle: bool = False,
    chunk_elements: int = 1 << 20,
    prefetch: int = 2,
    quiet: bool = False,
) -> WeightComparison:
    """Compare the weights of a chain of checkpoints, tensor by tensor, without building a model.

    Args:
        checkpoints: names to checkpoint directories, in chain order, e.g.
            ``{"Base": ..., "IN": ..., "RL": ...}`` (hub cache folders and open
            :class:`~vlm_probe.weights.Checkpoint` objects work too).
        steps: the deltas to measure as ``(from, to)`` name pairs; default the chain
            (``Base->IN``, ``IN->RL``). Each step is compared with the one before it in this list
            (cosine, sign agreement, subspace overlap).
        cuts: where the LLM's mid and late regions start, as 0-based decoder indices
            (``(8, 20)`` or ``"8,20"``); default thirds.
        svd: ``"auto"`` or ``"exact"`` (every singular value), ``"randomized"`` (top-k, marked and kept out
            of aggregate means) or ``"none"`` (norms only), or an
            :class:`~vlm_probe.weights.SVDConfig`.
        top_k: singular values and vectors kept per delta (when ``svd`` is a mode name).
        include: regular expression on module-path tensor names; only matching tensors are compared.
        allow_pickle: accept pickle-only checkpoints (they can run code when loaded).
        chunk_elements: elements read per chunk and checkpoint.
        prefetch: chunks read ahead in a background thread (0: no thread).
        quiet: no progress bar.

    Returns:
        A :class:`~vlm_probe.weights.WeightComparison`: one row per tensor and step.

    Raises:
        CheckpointMismatchError: different families, tensor sets or shapes (the tensors are named).
        CheckpointError: missing config, shards or weights; pickle refused; see
            :func:`~vlm_probe.weights.open_checkpoint`.
    """
    started = time.perf_counter()
    config = svd if isinstance(svd, SVDConfig) else SVDConfig(mode=svd, top_k=top_k)  # type: ignore[arg-type]
    opened = open_checkpoints(checkpoints, allow_pickle=allow_pickle)
    names = list(opened)
    ckpts = [opened[n] for n in names]
    step_idx = _resolve_steps(names, steps)
    pairs = [(s - 1, s) for s in range(1, len(step_idx))]
    ref = ckpts[0]
    try:
        pattern = re.compile(include) if include else None
    except re.error as error:
        raise InputError(f"include={include!r} is not a valid regular expression: {error}.") from error
    selected = [n for n in ref.tensors if pattern is None or pattern.search(n)]
    if not selected:
        raise InputError(f"include={include!r} matches no tensor of {ref.path}.")
    _check_tensors(opened, selected)
    cut = Cuts.make(cuts, ref.n_layers)

    skipped: list[dict[str, str]] = []
    compared: list[str] = []
    for n in selected:
        entries = [c.tensors[n] for c in ckpts]
        if not all(e.is_float for e in entries):
            skipped.append({"tensor": n, "reason": f"not floating point ({entries[0].dtype})"})
        elif entries[0].numel == 0:
            skipped.append({"tensor": n, "reason": "empty"})
        else:
            compared.append(n)

    used = sorted({i for step in step_idx for i in step})  # checkpoints no step touches are not read
    position = {i: k for k, i in enumerate(used)}
    local_steps = [(position[a], position[b]) for a, b in step_idx]
    local_names = [names[i] for i in used]
    jobs = [[(ckpts[i], ckpts[i].tensors[n]) for i in used] for n in compared]
    in_pairs = {i for pair in pairs for i in pair}
    kernel = NormKernel(len(used), local_steps, pairs)
    bytes_per_element = [sum(e.itemsize for _, e in job) for job in jobs]
    rows_of: dict[int, list[dict[str, Any]]] = {}
    waiting: dict[int, tuple[TensorNorms, list[Spectrum | None]]] = {}
    exact = GramSpectra(config.top_k, config.resolved_device(), config.resolved_batch_bytes(),
                        max(chunk_elements, 1 << 22))

    def finish(done: list[tuple[object, dict[int, Spectrum]]]) -> None:
        for key, found in done:
            index = int(key)  # type: ignore[call-overload]  # the tensor's position, given to exact.add
            norms, spectra = waiting.pop(index)
            for s, spectrum in found.items():
                spectra[s] = spectrum
            rows_of[index] = _rows(jobs[index], norms, spectra, local_names, local_steps, pairs, cut, config)

    nonfinite_notes: list[str] = []
    acc: TensorNorms | None = None
    progress = tqdm(
        total=sum(job[0][1].numel * b for job, b in zip(jobs, bytes_per_element)),
        unit="B", unit_scale=True, desc="weights", disable=quiet, leave=False,
    )
    try:
        for piece in stream(jobs, chunk_elements, prefetch):
            if acc is None:
                acc = kernel.new()
            kernel.update(acc, piece.views)
            progress.update(piece.count * bytes_per_element[piece.job])
            if not piece.last:
                continue
            job = jobs[piece.job]
            norms = finish_norms(acc, job, local_steps, pairs, chunk_elements)
            acc = None
            if norms.nonfinite:
                note = _nonfinite_note(norms, local_names)
                nonfinite_notes.append(f"{compared[piece.job]}: {note}")
            spectra, exact_steps = _spectra(job, norms, local_steps, pairs, config, chunk_elements)
            waiting[piece.job] = (norms, spectra)
            finish(exact.add(
                piece.job, job, [local_steps[s] for s in exact_steps], exact_steps,
                [norms.delta_sq[s] for s in exact_steps], [config.vectors and s in in_pairs for s in exact_steps],
            ))
        finish(exact.flush())
    finally:
        progress.close()
    rows = [row for index in sorted(rows_of) for row in rows_of[index]]

    if nonfinite_notes:
        warnings.warn(
            f"{len(nonfinite_notes)} tensor(s) hold NaN or Inf; their rows are flagged in the 'nonfinite' column "
            f"and left out of every aggregate: {'; '.join(nonfinite_notes[:3])}",
            NonFiniteWeightsWarning,
            stacklevel=2,
        )
    meta = {
        "checkpoints": {
            name: {
                "path": str(c.path),
                "format": c.format,
                "model_type": c.config.get("model_type"),
                "dtypes": dict(Counter(str(e.dtype).replace("torch.", "") for e in c.tensors.values())),
                "gib": round(c.nbytes / 2**30, 4),
            }
            for name, c in opened.items()
        },
        "family": ref.spec.name,
        "steps": [f"{names[a]}->{names[b]}" for a, b in step_idx],
        "pairs": [[f"{names[step_idx[s][0]]}->{names[step_idx[s][1]]}",
                   f"{names[step_idx[t][0]]}->{names[step_idx[t][1]]}"] for s, t in pairs],
        "cuts": cut.as_dict(),
        "n_layers": ref.n_layers,
        "vision_depths": list(ref.vision_depths),
        "svd": {**dataclasses.asdict(config), "device": str(config.resolved_device()) if config.mode != "none" else "n/a"},
        "include": include,
        "skipped": skipped,
        "warnings": [f"non-finite values: {note}" for note in nonfinite_notes],
        "seconds": round(time.perf_counter() - started, 3),
        "torch": torch.__version__,
    }
    return WeightComparison.from_rows(rows, meta)


def _nonfinite_note(norms: TensorNorms, names: Sequence[str]) -> str:
    return ", ".join(f"{names[i]} has {nan} NaN and {inf} Inf" for i, (nan, inf) in sorted(norms.nonfinite.items()))


def _spectra(
    job: Sequence[tuple[Checkpoint, TensorEntry]],
    norms: TensorNorms,
    steps: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
    config: SVDConfig,
    chunk_elements: int,
) -> tuple[list[Spectrum | None], list[int]]:
    """Randomized spectra of one tensor's steps, computed now, and the steps left for exact spectra."""
    entry = job[0][1]
    out: list[Spectrum | None] = [None] * len(steps)
    exact: list[int] = []
    if config.mode == "none" or len(entry.shape) < 2:
        return out, exact
    in_pairs = {i for pair in pairs for i in pair}
    for s, (a, b) in enumerate(steps):
        if a in norms.nonfinite or b in norms.nonfinite or norms.delta_sq[s] == 0.0:
            continue
        if config.method(entry.matrix_shape) == "exact":
            exact.append(s)
            continue
        generator = torch.Generator().manual_seed(config.seed + zlib.crc32(f"{entry.name}|{s}".encode()))
        out[s] = delta_spectrum(
            job[a], job[b], norms.delta_sq[s], config, vectors=config.vectors and s in in_pairs,
            generator=generator, chunk_elements=max(chunk_elements, 1 << 22),
        )
    return out, exact


def _rows(
    job: Sequence[tuple[Checkpoint, TensorEntry]],
    norms: TensorNorms,
    spectra: Sequence[Spectrum | None],
    names: Sequence[str],
    steps: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
    cut: Cuts,
    config: SVDConfig,
) -> list[dict[str, Any]]:
    entry = job[0][1]
    loc = entry.location
    nan = math.nan
    base = {
        "tensor": entry.name,
        "layer": loc.layer,
        "label": layer_label(loc),
        "region": region_of(loc, cut),
        "part": loc.region.value,
        "component": loc.component,
        "param": entry.name.rsplit(".", 1)[-1],
        "shape": "x".join(str(d) for d in entry.shape) or "scalar",
        "numel": entry.numel,
    }
    pair_of = {t: (k, s) for k, (s, t) in enumerate(pairs)}
    subspaces = overlaps(spectra, pairs)
    rows = []
    for s, (a, b) in enumerate(steps):
        bad = [i for i in (a, b) if i in norms.nonfinite]
        energy = nan if bad else norms.delta_sq[s]
        weight_sq = nan if a in norms.nonfinite else norms.weight_sq[a]
        frob = math.sqrt(energy) if not math.isnan(energy) else nan
        row = {
            **base,
            "step": f"{names[a]}->{names[b]}",
            "from": names[a],
            "to": names[b],
            "dtype": str(job[b][1].dtype).replace("torch.", ""),
            "frob": frob,
            "energy": energy,
            "weight_norm": math.sqrt(weight_sq) if not math.isnan(weight_sq) else nan,
            "rel_norm": _ratio(frob, math.sqrt(weight_sq) if not math.isnan(weight_sq) else nan),
            "nonfinite": "; ".join(
                f"{names[i]}: {norms.nonfinite[i][0]} NaN, {norms.nonfinite[i][1]} Inf" for i in sorted(set(bad))
            ),
        }
        spectrum = spectra[s]
        if spectrum is not None:
            metrics = spectral_metrics(spectrum.values, energy, config.top_k)
            whole = spectrum.complete  # a truncated spectrum has no effective rank
            row.update(
                spectral_norm=metrics.spectral_norm, stable_rank=metrics.stable_rank,
                erank_s=metrics.erank_s if whole else nan, erank_s2=metrics.erank_s2 if whole else nan,
                topk_energy=metrics.topk_energy, spectrum=metrics.spectrum,
                svd_mode=spectrum.method, svd_k=int(spectrum.values.numel()), svd_error_bound=spectrum.error_bound,
            )
        else:
            zero = energy == 0.0 and len(entry.shape) >= 2 and config.mode != "none"
            row.update(
                spectral_norm=0.0 if zero else nan, stable_rank=nan, erank_s=nan, erank_s2=nan, topk_energy=nan,
                spectrum=[], svd_mode="zero" if zero else "none", svd_k=0, svd_error_bound=nan,
            )
        if s in pair_of:
            k, prev = pair_of[s]
            prev_bad = any(i in norms.nonfinite for i in steps[prev])
            valid = not bad and not prev_bad
            dot = norms.dot[k] if valid else nan
            prev_energy = norms.delta_sq[prev] if valid else nan
            left, right = subspaces[k]
            row.update(
                prev_step=f"{names[steps[prev][0]]}->{names[steps[prev][1]]}",
                dot_prev=dot,
                cosine_prev=_ratio(dot, math.sqrt(prev_energy * energy)) if valid else nan,
                n_changed_both=norms.changed[k] if valid else 0,
                n_sign_agree=norms.agree[k] if valid else 0,
                sign_agree_prev=_ratio(float(norms.agree[k]), float(norms.changed[k])) if valid else nan,
                overlap_left_prev=left.overlap if left else nan,
                overlap_right_prev=right.overlap if right else nan,
                min_angle_left_prev=left.min_angle_deg if left else nan,
                min_angle_right_prev=right.min_angle_deg if right else nan,
                overlap_chance_left=left.chance if left else nan,
                overlap_chance_right=right.chance if right else nan,
                subspace_k=left.k if left else 0,
            )
        else:
            row.update(
                prev_step=None, dot_prev=nan, cosine_prev=nan, n_changed_both=0, n_sign_agree=0, sign_agree_prev=nan,
                overlap_left_prev=nan, overlap_right_prev=nan, min_angle_left_prev=nan, min_angle_right_prev=nan,
                overlap_chance_left=nan, overlap_chance_right=nan, subspace_k=0,
            )
        rows.append(row)
    return rows


def _ratio(x: float, y: float) -> float:
    if math.isnan(x) or math.isnan(y):
        return math.nan
    if y == 0.0:
        return math.nan if x == 0.0 else math.inf
    return x / y
