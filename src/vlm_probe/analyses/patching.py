"""Activation patching sweeps: within a model (clean -> corrupt) and across checkpoints.

``sweep`` patches clean activations into the corrupted run for every (site, layer, positions)
cell and scores each patched run with a metric. It is fast by construction: the clean and
corrupt runs happen once, many cells are packed into one batched forward (each cell edits
only its own rows; ``max_rows`` bounds the batch), the vision tower runs once per image, and
no value leaves the device until a chunk is done.

``cross_patch`` puts one checkpoint's activations into another's run (RL into IN and the
reverse) and reports how much of their output difference each layer restores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions import sites as site_ops
from ..interventions.positions import PositionSpec, positions_label, resolve_positions
from ..model.inputs import Batch
from ..results import Result
from . import metrics as M
from .batched import (SITE_ORDER, Capture, capture, keep_logits, metric_index, plan_chunks, repeat_rows,
                      suffix_start)
from .parallel import gather_frame, shard_indices


@dataclass(frozen=True, eq=False)
class Cell:
    """One patched variant: a site of a layer at some positions."""

    site: str
    layer: int
    label: str
    mask: Tensor  #: [batch, seq]


def expand_positions(batch: Batch, positions: PositionSpec | Sequence[PositionSpec], vlm: Any) -> list[tuple[str, Tensor]]:
    """Position cells: one spec, a list of specs, or ``"each"`` / ``"each:<group>"`` (one cell per position)."""
    if isinstance(positions, str) and positions.startswith("each"):
        group = positions.split(":", 1)[1] if ":" in positions else "all"
        base = resolve_positions(batch, group, vlm=vlm, what=f"patching {group!r}")
        columns = [p for p in range(batch.width) if bool(base[:, p].any())]
        if group != "all" and not batch.layout.uniform(group):
            raise InputError(f"positions='each:{group}' needs {group!r} at the same positions in every row.")
        return [(str(p), base & (torch.arange(batch.width) == p)[None, :]) for p in columns]
    specs = positions if isinstance(positions, (list, tuple)) and positions and not isinstance(positions[0], int) else [positions]
    return [(positions_label(spec), resolve_positions(batch, spec, vlm=vlm, what=f"patching {spec!r}")) for spec in specs]


class PatchingResult(Result):
    """Per (sample, site, layer, positions) metric values of a patching sweep.

    Columns: ``sample``, ``site``, ``layer`` (0-based decoder index), ``unified_layer``
    (``layer + 1``), ``positions``, ``metric``, ``value``, ``clean``, ``corrupt``, ``normalized``
    (``(value - corrupt) / (clean - corrupt)`` for normalizable metrics), and for
    cross-checkpoint sweeps ``receiver`` and ``donor``.
    """

    kind = "patching"

    def summary(self) -> pd.DataFrame:
        """Mean over samples per cell."""
        keys = [c for c in ("receiver", "donor", "site", "layer", "unified_layer", "positions", "metric") if c in self.frame]
        value_cols = [c for c in ("value", "normalized") if c in self.frame]
        return self.frame.groupby(keys, sort=False)[value_cols].mean().reset_index()

    def overlay(self, batch: Batch, *, sample: int = 0, layer: int | None = None, site: str | None = None,
                value: str = "value", image: int = 0, **kwargs: Any) -> Any:
        """The per-vision-token effect (a ``positions="each:vision"`` sweep) drawn over the image.

        Args:
            batch: the batch the sweep ran on (the corrupted one; it holds the images).
            layer: 0-based decoder layer (default: the layer with the largest mean effect).
        """
        from .overlay import overlay_figure, vision_values

        frame = self.frame[self.frame["sample"] == sample]
        frame = frame[frame["positions"].str.fullmatch(r"\d+")]
        if frame.empty:
            raise InputError("overlay() needs a per-token sweep: run it with positions='each:vision'.")
        if site is not None:
            frame = frame[frame["site"] == site]
        if layer is None:
            layer = int(frame.groupby("layer")[value].apply(lambda v: v.abs().mean()).idxmax())
        frame = frame[frame["layer"] == layer]
        per_position = {int(p): float(v) for p, v in zip(frame["positions"], frame[value])}
        row = batch.layout[sample]
        values = vision_values(row, per_position)
        title = kwargs.pop("title", f"{frame['metric'].iloc[0]} of patching each vision token at L{layer + 1}")
        return overlay_figure(batch.rows[sample].images[image], row, values, image_index=image, title=title, **kwargs)

    def plot(self, value: str | None = None, **kwargs: Any) -> Any:
        """Heatmap of the mean effect, layers x positions (one panel per site / direction)."""
        from .plots import patching_figure

        return patching_figure(self, value=value, **kwargs)


def _run_cells(
    vlm: Any,
    base: Batch,
    source: Capture,
    base_logits: Tensor,
    cells: list[Cell],
    metric: Any,
    reuse: Capture | None,
    max_rows: int,
    progress: bool,
    desc: str,
) -> list[dict[str, Any]]:
    """Patch ``source`` activations into ``base`` for every cell, many cells per forward."""
    n = len(base)
    per_chunk = max(1, max_rows // n)
    rows_out: list[dict[str, Any]] = []
    bar = tqdm(total=len(cells), desc=desc, disable=not progress, unit="cell")
    _, base_positions = metric_index(base, metric.position)
    prefix = reuse.activations if reuse is not None else {}
    cache = reuse.cache if reuse is not None else None

    def start_of(group: Sequence[Cell]) -> int:
        return suffix_start(vlm, base, [c.mask for c in group], base_positions) if cache is not None else 0

    # cells sorted by first edited column, then depth: a chunk reruns only the columns from its
    # first edited one (over the unpatched run's KV cache) and skips every layer below its
    # shallowest cell, replaying the unpatched run's outputs there (nothing else differs from it)
    starts = [start_of([cell]) for cell in cells]
    order_of_cells = sorted(range(len(cells)), key=lambda c: (starts[c], cells[c].layer, SITE_ORDER[cells[c].site]))
    depths = [cells[c].layer if reuse is not None else 0 for c in order_of_cells]  # no reuse: full runs
    plan = plan_chunks([starts[c] for c in order_of_cells], depths, n, base.width, vlm.n_layers, per_chunk)
    for span in plan:
        chunk_ids = [order_of_cells[c] for c in span]
        chunk = [cells[c] for c in chunk_ids]
        k = len(chunk)
        start = start_of(chunk)
        rows, positions = metric_index(base, metric.position, k)
        keep, column = keep_logits(positions - start)
        groups: dict[tuple[str, int], list[int]] = {}
        for i, cell in enumerate(chunk):
            groups.setdefault((cell.site, cell.layer), []).append(i)
        order = sorted(groups, key=lambda s: (s[1], SITE_ORDER[s[0]]))
        shallowest = min(cell.layer for cell in chunk)
        inputs = cache.continuation(vlm, base, start, k) if start else repeat_rows(base, k)
        with torch.no_grad(), vlm.trace(inputs, use_cache=bool(start), logits_to_keep=keep):
            if not start and reuse is not None and reuse.vision is not None:
                vlm.vision.root.skip(reuse.vision.tiled(k))
            for layer in range(shallowest):
                if ("layer_out", layer) in prefix:
                    vlm.layers[layer].skip(prefix[("layer_out", layer)][:, start:].repeat(k, 1, 1))
            for site, layer in order:
                act = site_ops.read(vlm, site, layer)
                new = act.clone()
                src = source.activations[(site, layer)][:, start:].to(act.device, act.dtype)
                for i in groups[(site, layer)]:
                    mask = chunk[i].mask[:, start:].to(act.device)
                    block = new[i * n : (i + 1) * n]
                    block[mask] = src[mask]
                site_ops.write(vlm, site, layer, new)
            logits = vlm.lm_head.output[rows, column].save()
        clean_l = source.logits.repeat(k, 1)
        base_l = base_logits.repeat(k, 1)
        values = metric(logits.float(), clean_l.float(), base_l.float()).cpu()
        clean_v = metric(clean_l.float(), clean_l.float(), base_l.float()).cpu()
        base_v = metric(base_l.float(), clean_l.float(), base_l.float()).cpu()
        for i, cell in enumerate(chunk):
            for s in range(n):
                r = i * n + s
                row = {
                    "cell": chunk_ids[i],
                    "sample": s,
                    "site": cell.site,
                    "layer": cell.layer,
                    "unified_layer": cell.layer + 1,
                    "positions": cell.label,
                    "metric": metric.name,
                    "value": float(values[r]),
                    "clean": float(clean_v[r]),
                    "corrupt": float(base_v[r]),
                }
                if metric.normalizable:
                    denom = row["clean"] - row["corrupt"]
                    row["normalized"] = (row["value"] - row["corrupt"]) / denom if abs(denom) > 1e-12 else float("nan")
                rows_out.append(row)
        bar.update(k)
    bar.close()
    return rows_out


def _cells(vlm: Any, batch: Batch, sites: Sequence[str], layers: Sequence[int], positions: Any) -> list[Cell]:
    for site in sites:
        site_ops.check_site(site)
    for layer in layers:
        vlm.layers[layer]  # bounds check with a helpful error
    pos_cells = expand_positions(batch, positions, vlm)
    return [Cell(site, layer, label, mask) for layer in layers for site in sites for label, mask in pos_cells]


def _prefix_sites(cells: list[Cell]) -> list[tuple[str, int]]:
    """Layer outputs of the unpatched run that chunks replay below their shallowest cell."""
    deepest = max((cell.layer for cell in cells), default=0)
    return [("layer_out", layer) for layer in range(deepest)]


def _as_list(x: Any) -> list[Any]:
    return [x] if isinstance(x, str) else list(x)


def _patching_frame(
    receiver: Any,
    donor: Any,
    source_batch: Batch,
    base_batch: Batch,
    sites: list[str],
    layers: list[int],
    positions: Any,
    metric: Any,
    max_rows: int,
    reuse_vision: bool,
    progress: bool,
    desc: str,
    extra: dict[str, Any],
) -> pd.DataFrame:
    """Run ``donor`` on ``source_batch`` once, then patch its activations into ``receiver``'s run
    of ``base_batch`` cell by cell; this process's share of the samples, gathered."""
    mine = shard_indices(len(base_batch))
    rows: list[dict[str, Any]] = []
    if mine:
        source_part, base_part = source_batch[mine], base_batch[mine]
        cells = _cells(receiver, base_part, sites, layers, positions)
        source = capture(donor, source_part, [(c.site, c.layer) for c in cells],
                         metric_index(source_part, metric.position))
        base = capture(receiver, base_part, _prefix_sites(cells) if reuse_vision else (),
                       metric_index(base_part, metric.position), vision=reuse_vision, cache=reuse_vision)
        rows = _run_cells(receiver, base_part, source, base.logits, cells, metric, base if reuse_vision else None,
                          max_rows, progress, desc)
        for row in rows:
            row.update(sample=mine[row["sample"]], **extra)
    return gather_frame(pd.DataFrame(rows), sort=["cell", "sample"])


def sweep(
    vlm: Any,
    clean: Batch,
    corrupt: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "vision",
    metric: Any = None,
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, cell by cell, and score each.

    Args:
        clean: the clean batch (same samples and width as ``corrupt``; see ``vlm_probe.align``).
        corrupt: the corrupted batch the patches go into.
        site: one site or several (``layer_out``, ``layer_in``, ``attn_out``, ``mlp_out``, ``q``...).
        layers: 0-based decoder layers (default: all).
        positions: a position spec, a list of specs (one cell each), or ``"each:<group>"``.
        metric: a metric from :mod:`vlm_probe.analyses.metrics` (default: ``restored()``).
        max_rows: rows per batched forward (cells x samples), the memory budget.
        reuse_vision: reuse the unpatched run: run the vision tower once and replay its output
            for repeated rows, replay its layer outputs below each chunk's shallowest cell, and
            (causal families) rerun only the columns from a chunk's first edited position on,
            over its KV cache. ``False`` runs every chunk in full (the same numbers, slower).

    Returns:
        A :class:`PatchingResult`. Under ``accelerate launch`` the samples are split across
        processes and every process returns the full table.
    """
    if clean.width != corrupt.width or len(clean) != len(corrupt):
        raise InputError(
            f"clean ({len(clean)} x {clean.width}) and corrupt ({len(corrupt)} x {corrupt.width}) must have the same "
            "samples and width; prepare them together or use vlm_probe.align(clean, corrupt)."
        )
    metric = metric or M.restored()
    layers = list(range(vlm.n_layers)) if layers is None else list(layers)
    frame = _patching_frame(vlm, vlm, clean, corrupt, _as_list(site), layers, positions, metric, max_rows,
                            reuse_vision, progress, "patching", {})
    return PatchingResult(frame, {"analysis": "sweep", "metric": metric.name, "sites": _as_list(site),
                                  "layers": layers, "positions": str(positions), "n_samples": len(clean)})


def cross_patch(
    receiver: Any,
    donor: Any,
    batch: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "all",
    metric: Any = None,
    names: tuple[str, str] = ("receiver", "donor"),
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
) -> PatchingResult:
    """Put ``donor``'s activations into ``receiver``'s run, layer by layer.

    With the default metric (:func:`~vlm_probe.analyses.metrics.restored`) each value is the
    share of the donor-vs-receiver output difference that patching that cell restores
    (0: none, 1: all). Both models must be checkpoints of one architecture.
    """
    from ..model.checkpoint_set import check_same_architecture

    check_same_architecture({names[0]: receiver, names[1]: donor})
    metric = metric or M.restored()
    layers = list(range(receiver.n_layers)) if layers is None else list(layers)
    frame = _patching_frame(receiver, donor, batch, batch, _as_list(site), layers, positions, metric, max_rows,
                            reuse_vision, progress, f"{names[1]} -> {names[0]}",
                            {"receiver": names[0], "donor": names[1]})
    return PatchingResult(frame, {"analysis": "cross_patch", "metric": metric.name, "sites": _as_list(site),
                                  "layers": layers, "positions": str(positions), "receiver": names[0],
                                  "donor": names[1]})


def cross_checkpoint_sweep(
    models: Any, batch: Batch, *, a: str = "IN", b: str = "RL", both: bool = True, **kwargs: Any
) -> PatchingResult:
    """Cross-checkpoint patching on a checkpoint set: ``b`` into ``a`` (and ``a`` into ``b``)."""
    first = cross_patch(models[a], models[b], batch, names=(a, b), **kwargs)
    if not both:
        return first
    second = cross_patch(models[b], models[a], batch, names=(b, a), **kwargs)
    frame = pd.concat([first.frame, second.frame], ignore_index=True)
    return PatchingResult(frame, {**first.meta, "analysis": "cross_checkpoint_sweep", "pair": [a, b]})


def layer_increments(result: PatchingResult, value: str = "value") -> pd.DataFrame:
    """Per-layer increase of a cumulative effect (e.g. ``restored`` of ``layer_out`` patches):
    the share of the difference attributed to each layer."""
    summary = result.summary().sort_values("layer")
    keys = [c for c in ("receiver", "donor", "site", "positions", "metric") if c in summary]
    summary["increment"] = summary.groupby(keys)[value].diff().fillna(summary[value])
    return summary


def answer_sweep(
    vlm: Any,
    clean: Batch,
    corrupt: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "vision",
    max_new_tokens: int = 8,
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
    generation_config: Any = None,
) -> PatchingResult:
    """Answer-level patching: patch clean activations into the corrupted prompt at prefill,
    generate greedily, and record whether the answer changed.

    Values: ``value`` = 1 when the greedy answer differs from the unpatched corrupt answer
    (metric ``greedy_answer_change``); ``matches_clean`` = 1 when it equals the clean answer;
    the answers themselves are in ``answer``, ``clean_answer``, ``corrupt_answer``.
    """
    from .generation import config_record, decode_new, eos_ids, generate_texts, generation_defaults, greedy_config

    if clean.width != corrupt.width or len(clean) != len(corrupt):
        raise InputError("clean and corrupt must have the same samples and width; use vlm_probe.align(clean, corrupt).")
    config = generation_config or greedy_config(vlm, max_new_tokens)
    layers = list(range(vlm.n_layers)) if layers is None else list(layers)
    sites = _as_list(site)
    mine = shard_indices(len(clean))
    rows: list[dict[str, Any]] = []
    if mine:
        clean_s, corrupt_s = clean[mine], corrupt[mine]
        cells = _cells(vlm, corrupt_s, sites, layers, positions)
        source = capture(vlm, clean_s, [(c.site, c.layer) for c in cells])
        vision = capture(vlm, corrupt_s, vision=True).vision if reuse_vision else None
        clean_answers = generate_texts(vlm, clean_s, config)
        corrupt_answers = generate_texts(vlm, corrupt_s, config)
        n = len(corrupt_s)
        bar = tqdm(total=len(cells), desc="answer patching", disable=not progress, unit="cell")
        for start in range(0, len(cells), max(1, max_rows // n)):
            chunk = cells[start : start + max(1, max_rows // n)]
            k = len(chunk)
            batch = repeat_rows(corrupt_s, k)
            groups: dict[tuple[str, int], list[int]] = {}
            for i, cell in enumerate(chunk):
                groups.setdefault((cell.site, cell.layer), []).append(i)
            with torch.no_grad(), generation_defaults(vlm.hf, config), \
                    vlm.generate(batch, generation_config=config) as tracer:
                if vision is not None:
                    vlm.vision.root.skip(vision.tiled(k))
                for site_name, layer in sorted(groups, key=lambda s: (s[1], SITE_ORDER[s[0]])):
                    act = site_ops.read(vlm, site_name, layer)
                    new = act.clone()
                    src = source.activations[(site_name, layer)].to(act.device, act.dtype)
                    for i in groups[(site_name, layer)]:
                        block = new[i * n : (i + 1) * n]
                        block[chunk[i].mask.to(act.device)] = src[chunk[i].mask.to(act.device)]
                    site_ops.write(vlm, site_name, layer, new)
                ids = tracer.result.save()
            answers = decode_new(vlm, ids, batch.width, eos_ids(vlm, config))
            for i, cell in enumerate(chunk):
                for s in range(n):
                    answer = answers[i * n + s]
                    rows.append({"cell": start + i, "sample": mine[s], "site": cell.site, "layer": cell.layer,
                                 "unified_layer": cell.layer + 1, "positions": cell.label,
                                 "metric": "greedy_answer_change", "value": float(answer != corrupt_answers[s]),
                                 "matches_clean": float(answer == clean_answers[s]), "answer": answer,
                                 "clean_answer": clean_answers[s], "corrupt_answer": corrupt_answers[s]})
            bar.update(k)
        bar.close()
    frame = gather_frame(pd.DataFrame(rows), sort=["cell", "sample"])
    return PatchingResult(frame, {"analysis": "answer_sweep", "metric": "greedy_answer_change", "sites": sites,
                                  "layers": layers, "positions": str(positions), "generation": config_record(config)})
