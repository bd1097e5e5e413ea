"""Activation patching sweeps: within a model (clean -> corrupt) and across checkpoints.

``sweep`` patches clean activations into the corrupted run for every (site, layer, positions)
cell and scores each patched run with a metric; ``cross_patch`` puts one checkpoint's
activations into another's run (RL into IN and the reverse). Both are thin builders of
variants -- one :class:`~vlm_probe.interventions.Patch` per cell -- for the engine
(:mod:`vlm_probe.analyses.engine`), which keeps them fast (vision tower once, replay below
the shallowest edit, KV-suffix reruns, chunks planned over the recomputed work). Every
registered site works: decoder sites, ``embed``, ``final_norm``, the vision blocks
(``vision_out``/``vision_in``) and the ``projector``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..errors import InputError
from ..interventions import sites as S
from ..interventions.objects import Patch
from ..interventions.positions import PositionSpec, positions_label, resolve_positions
from ..model.inputs import Batch
from ..results import Result
from . import metrics as M
from .engine import Greedy, Logits, Source, Variant, run
from .options import RunOptions
from .parallel import gather_frame, shard_indices


@dataclass(frozen=True, eq=False)
class Cell:
    """One patched variant: a site of a layer (or vision block) at some positions."""

    site: str
    layer: int
    label: str
    positions: PositionSpec

    def intervention(self, source: str) -> Patch:
        return Patch(self.site, self.layer, self.positions, source=source)


def expand_positions(batch: Batch, positions: PositionSpec | Sequence[PositionSpec], vlm: Any) -> list[tuple[str, PositionSpec]]:
    """Position cells: one spec, a list of specs, or ``"each"`` / ``"each:<group>"`` (one cell per position)."""
    if isinstance(positions, str) and positions.startswith("each"):
        group = positions.split(":", 1)[1] if ":" in positions else "all"
        base = resolve_positions(batch, group, vlm=vlm, what=f"patching {group!r}")
        columns = [p for p in range(batch.width) if bool(base[:, p].any())]
        if group != "all" and not batch.layout.uniform(group):
            raise InputError(f"positions='each:{group}' needs {group!r} at the same positions in every row.")
        return [(str(p), base & (torch.arange(batch.width) == p)[None, :]) for p in columns]
    specs = positions if isinstance(positions, (list, tuple)) and positions and not isinstance(positions[0], int) else [positions]
    for spec in specs:
        resolve_positions(batch, spec, vlm=vlm, what=f"patching {spec!r}")  # fail early with a clear error
    return [(positions_label(spec), spec) for spec in specs]


class PatchingResult(Result):
    """Per (sample, site, layer, positions) metric values of a patching sweep.

    Columns: ``cell``, ``sample``, ``site``, ``layer`` (0-based decoder index, or vision block),
    ``unified_layer`` (decoder ``layer + 1``; vision blocks negative, projector 0), ``positions``,
    ``metric``, ``value``, ``clean``, ``corrupt``, ``normalized`` (``(value - corrupt) / (clean -
    corrupt)`` for normalizable metrics), ``variant`` (the cell's interventions as JSON: re-run
    it with :func:`~vlm_probe.analyses.engine.rerun`), and for cross-checkpoint sweeps
    ``receiver`` and ``donor``.
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


def _as_list(x: Any) -> list[Any]:
    return [x] if isinstance(x, str) else list(x)


def _cells(vlm: Any, batch: Batch, sites: Sequence[str], layers: Sequence[int] | None, positions: Any) -> list[Cell]:
    """Cells in layer order: every (layer, site, positions) of decoder sites, and for the
    vision blocks, the projector, the embeddings and the final norm their own indices
    (``layers`` apply to indexed sites; negative ones count from the end)."""
    pos_cells = expand_positions(batch, positions, vlm)
    cells = []
    for site in sites:
        entry = S.site(site)
        cell_positions = pos_cells if entry.tokens else [("all", "all")]
        for layer in S.indices(vlm, site, layers if entry.indexed else None):
            for label, spec in cell_positions:
                cells.append(Cell(site, layer, label, spec))
    return sorted(cells, key=lambda c: S.unified(vlm, c.site, c.layer))


def _patching_frame(
    receiver: Any,
    donor: Any,
    source_batch: Batch,
    base_batch: Batch,
    sites: list[str],
    layers: Sequence[int] | None,
    positions: Any,
    metric: Any,
    options: RunOptions,
    desc: str,
    extra: dict[str, Any],
    cells: Sequence[Cell] | None = None,
) -> pd.DataFrame:
    """Run ``donor`` on ``source_batch`` once, then patch its activations into ``receiver``'s run
    of ``base_batch`` cell by cell (``cells``: these instead of every site x layer x positions
    cell); this process's share of the samples, gathered."""
    mine = shard_indices(len(base_batch), options.backend)
    rows: list[dict[str, Any]] = []
    if mine:
        source_part, base_part = source_batch[mine], base_batch[mine]
        cells = list(cells) if cells is not None else _cells(receiver, base_part, sites, layers, positions)
        variants = [Variant((cell.intervention("source"),)) for cell in cells]
        out = run(receiver, base_part, variants, Logits(metric.position), sources={"source": Source(donor, source_part)},
                  options=options, desc=desc)
        samples = torch.tensor(mine)
        clean_l, base_l = out.sources["source"].logits.float(), out.base.logits.float()
        clean_v = M.score(metric, clean_l, clean_l, base_l, samples).cpu()
        base_v = M.score(metric, base_l, clean_l, base_l, samples).cpu()
        for c, (cell, variant, logits) in enumerate(zip(cells, variants, out.outputs)):
            values = M.score(metric, logits.float(), clean_l, base_l, samples).cpu()
            text = variant.to_json()
            for s, sample in enumerate(mine):
                row = {"cell": c, "sample": sample, "site": cell.site, "layer": cell.layer,
                       "unified_layer": S.unified(receiver, cell.site, cell.layer), "positions": cell.label,
                       "metric": metric.name, "value": float(values[s]), "clean": float(clean_v[s]),
                       "corrupt": float(base_v[s])}
                if metric.normalizable:
                    denom = row["clean"] - row["corrupt"]
                    row["normalized"] = (row["value"] - row["corrupt"]) / denom if abs(denom) > 1e-12 else float("nan")
                row.update(extra, variant=text)
                rows.append(row)
    return gather_frame(pd.DataFrame(rows), sort=["cell", "sample"], parallel=options.backend)


def check_paired(clean: Batch, corrupt: Batch) -> None:
    """Raise :class:`InputError` unless the two batches hold as many samples of the same width."""
    if clean.width != corrupt.width or len(clean) != len(corrupt):
        raise InputError(
            f"clean ({len(clean)} x {clean.width}) and corrupt ({len(corrupt)} x {corrupt.width}) must have the same "
            "samples and width; prepare them together or use vlm_probe.align(clean, corrupt)."
        )


def _meta(options: RunOptions, **meta: Any) -> dict[str, Any]:
    return {**meta, "options": options.record()}


def sweep(
    vlm: Any,
    clean: Batch,
    corrupt: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "vision",
    metric: Any = None,
    options: RunOptions | None = None,
    **legacy: Any,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, cell by cell, and score each.

    Args:
        clean: the clean batch (same samples and width as ``corrupt``; see ``vlm_probe.align``).
        corrupt: the corrupted batch the patches go into.
        site: one registered site or several (``layer_out``, ``layer_in``, ``attn_out``,
            ``mlp_out``, ``q``, ..., ``embed``, ``final_norm``, ``vision_out``, ``projector``;
            see :mod:`vlm_probe.interventions.sites`).
        layers: 0-based decoder layers, or vision blocks for vision sites (default: all;
            negative ones count from the end).
        positions: a position spec, a list of specs (one cell each), or ``"each:<group>"``
            (vision and projector sites always patch the whole image).
        metric: a metric from :mod:`vlm_probe.analyses.metrics` (default: ``restored()``).
        options: :class:`~vlm_probe.analyses.RunOptions` (``max_rows``, ``reuse``,
            ``progress``, ``parallel``); the keywords ``max_rows=``, ``reuse_vision=``,
            ``progress=`` still work.

    Returns:
        A :class:`PatchingResult`; its ``variant`` column holds each cell's intervention as JSON.
    """
    options = RunOptions.resolve(options, legacy, "sweep")
    check_paired(clean, corrupt)
    metric = metric or M.restored()
    frame = _patching_frame(vlm, vlm, clean, corrupt, _as_list(site), layers, positions, metric, options,
                            "patching", {})
    _warn_undefined(frame, metric)
    return PatchingResult(frame, _meta(options, analysis="sweep", metric=metric.name, sites=_as_list(site),
                                       layers=_layers_meta(frame), positions=str(positions), n_samples=len(clean)))


def _layers_meta(frame: pd.DataFrame) -> list[int]:
    return sorted({int(x) for x in frame["layer"]}) if len(frame) else []


def _warn_undefined(frame: pd.DataFrame, metric: Any) -> None:
    """Say how many samples got an undefined (NaN) value, e.g. ``restored`` where clean and
    corrupt outputs agree, or any metric on a model whose outputs are not finite."""
    if frame.empty or "value" not in frame:
        return
    bad = frame.loc[frame["value"].isna(), "sample"].unique()
    if len(bad):
        why = ("their clean and corrupt outputs agree (nothing to restore)" if metric.name == "restored"
               else "the model's outputs are not finite there")
        warnings.warn(f"{metric.name} is undefined (NaN) for {len(bad)} of {frame['sample'].nunique()} sample(s) "
                      f"({sorted(bad.tolist())[:8]}): {why}. Summaries leave them out.", stacklevel=3)


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
    options: RunOptions | None = None,
    **legacy: Any,
) -> PatchingResult:
    """Put ``donor``'s activations into ``receiver``'s run, layer by layer (any registered
    site: ``site="vision_out"`` patches the vision tower block by block, ``site="projector"``
    the projector's output).

    With the default metric (:func:`~vlm_probe.analyses.metrics.restored`) each value is the
    share of the donor-vs-receiver output difference that patching that cell restores
    (0: none, 1: all). Both models must be checkpoints of one architecture.
    """
    from ..model.checkpoint_set import check_same_architecture

    options = RunOptions.resolve(options, legacy, "cross_patch")
    check_same_architecture({names[0]: receiver, names[1]: donor})
    metric = metric or M.restored()
    frame = _patching_frame(receiver, donor, batch, batch, _as_list(site), layers, positions, metric, options,
                            f"{names[1]} -> {names[0]}", {"receiver": names[0], "donor": names[1]})
    _warn_undefined(frame, metric)
    return PatchingResult(frame, _meta(options, analysis="cross_patch", metric=metric.name, sites=_as_list(site),
                                       layers=_layers_meta(frame), positions=str(positions), receiver=names[0],
                                       donor=names[1]))


def cross_checkpoint_sweep(
    models: Any, batch: Batch, *, a: str = "IN", b: str = "RL", both: bool = True, **kwargs: Any
) -> PatchingResult:
    """Cross-checkpoint patching on a checkpoint set: ``b`` into ``a`` (and ``a`` into ``b``).

    ``models`` is a :class:`~vlm_probe.model.checkpoint_set.CheckpointSet` (or a mapping of
    names to VLMs) holding ``a`` and ``b``, two different checkpoints.
    """
    from collections.abc import Mapping

    if not isinstance(models, Mapping):
        raise InputError(
            f"cross_checkpoint_sweep takes a checkpoint set, got {type(models).__name__}: use "
            "vlm_probe.load_set(IN=..., RL=...) (or a dict of names to VLMs), or cross_patch(receiver, donor, batch) "
            "for two models."
        )
    missing = [name for name in (a, b) if name not in models]
    if missing:
        raise InputError(f"No checkpoint {', '.join(map(repr, missing))} in this set; it has {', '.join(models)}. "
                         "Pass a= and b= with names from the set.")
    if a == b or models[a] is models[b]:
        raise InputError(f"a={a!r} and b={b!r} are the same checkpoint: there is no difference to restore "
                         "(every value would be undefined). Pass two different checkpoints.")
    first = cross_patch(models[a], models[b], batch, names=(a, b), **kwargs)
    if not both:
        return first
    second = cross_patch(models[b], models[a], batch, names=(b, a), **kwargs)
    frame = pd.concat([first.frame, second.frame], ignore_index=True)
    return PatchingResult(frame, {**first.meta, "analysis": "cross_checkpoint_sweep", "pair": [a, b]})


def layer_increments(result: PatchingResult, value: str = "value") -> pd.DataFrame:
    """Per-layer increase of a cumulative effect (e.g. ``restored`` of ``layer_out`` patches at
    ``positions="all"``): the share of the difference attributed to each layer.

    The increments mean something only when each layer's cell contains the previous one's
    effect: the residual stream (``layer_out``/``layer_in``) patched at every position. Other
    sites or position sets give differences of unrelated cells; a warning says so.
    """
    summary = result.summary().sort_values("layer")
    sites = set(summary["site"]) if "site" in summary else set()
    positions = set(summary["positions"]) if "positions" in summary else set()
    if not sites <= {"layer_out", "layer_in"} or not positions <= {"all"}:
        warnings.warn(
            f"layer_increments: sites {sorted(sites)} at positions {sorted(positions)} are not a cumulative effect "
            "(only the residual stream patched at positions='all' is); the increments are differences of "
            "unrelated cells.", stacklevel=2)
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
    options: RunOptions | None = None,
    **legacy: Any,
) -> PatchingResult:
    """Answer-level patching: patch clean activations into the corrupted prompt at prefill,
    generate greedily, and record whether the answer changed.

    Values: ``value`` = 1 when the greedy answer differs from the unpatched corrupt answer
    (metric ``greedy_answer_change``); ``matches_clean`` = 1 when it equals the clean answer;
    the answers themselves are in ``answer``, ``clean_answer``, ``corrupt_answer``.
    ``max_new_tokens=`` and ``generation_config=`` still work (or set them in ``options``).
    """
    from .generation import config_record, eos_ids, greedy_config

    options = RunOptions.resolve(options, legacy, "answer_sweep")
    check_paired(clean, corrupt)
    config = options.generation_config or greedy_config(vlm, options.max_new_tokens)
    readout = Greedy(config, frozenset(eos_ids(vlm, config)))
    sites = _as_list(site)
    mine = shard_indices(len(clean), options.backend)
    rows: list[dict[str, Any]] = []
    if mine:
        clean_s, corrupt_s = clean[mine], corrupt[mine]
        cells = _cells(vlm, corrupt_s, sites, layers, positions)
        variants = [Variant(())] + [Variant((cell.intervention("clean"),)) for cell in cells]
        out = run(vlm, corrupt_s, variants, readout, sources={"clean": Source(vlm, clean_s)}, options=options,
                  desc="answer patching")
        quiet = dataclasses.replace(options, progress=False)
        clean_answers = [g.text for g in run(vlm, clean_s, [Variant(())], readout, options=quiet).outputs[0]]
        corrupt_answers = [g.text for g in out.outputs[0]]
        for c, (cell, variant, answers) in enumerate(zip(cells, variants[1:], out.outputs[1:])):
            text = variant.to_json()
            for s, sample in enumerate(mine):
                answer = answers[s].text
                rows.append({"cell": c, "sample": sample, "site": cell.site, "layer": cell.layer,
                             "unified_layer": S.unified(vlm, cell.site, cell.layer), "positions": cell.label,
                             "metric": "greedy_answer_change", "value": float(answer != corrupt_answers[s]),
                             "matches_clean": float(answer == clean_answers[s]), "answer": answer,
                             "clean_answer": clean_answers[s], "corrupt_answer": corrupt_answers[s],
                             "variant": text})
    frame = gather_frame(pd.DataFrame(rows), sort=["cell", "sample"], parallel=options.backend)
    return PatchingResult(frame, _meta(options, analysis="answer_sweep", metric="greedy_answer_change", sites=sites,
                                       layers=_layers_meta(frame), positions=str(positions),
                                       generation=config_record(config)))
