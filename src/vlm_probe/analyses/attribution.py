"""Attribution patching (AtP, AtP*): a gradient estimate of every patching cell at once.

    from vlm_probe.analyses import attribution_sweep, metrics as M
    result = attribution_sweep(vlm, clean, corrupt, site=["layer_out", "attn_out", "k"],
                               positions=["vision", "question", "last"], metric=M.logit_diff(...))
    result.plot(); result.ranking().head(10)
    exact = result.confirm(vlm, clean, corrupt, metric=metric, k=10)   # exact patching of the top 10

Patching a cell (a site of a layer at some positions) replaces the receiver's activation
``a`` with the source's ``a'``. Attribution estimates the metric after the patch as
``m(corrupt) + (a' - a) . dm/da`` with the gradient taken on the receiver's run, for every
cell from one source forward (no gradients), one receiver forward and one backward pass per
batch of samples (Nanda 2022; Kramár et al. 2024). Per-position contributions add up, so
``positions="each:vision"`` costs nothing more and draws over the image (``result.overlay``).

AtP* corrections (Kramár et al. 2024), both checked against hand computations in the tests:

* ``corrections=("qk",)`` (default): for query and key sites the attention pattern is
  recomputed exactly with the patched queries or keys and only the step after it is linear
  (:mod:`~vlm_probe.analyses.attention_fix`), which removes the false negatives of saturated
  softmaxes.
* ``graddrop=True``: one more backward pass per decoder layer ``l`` with the gradient through
  that layer's attention and MLP outputs dropped; the ``graddrop`` column holds
  ``sum_l |estimate_l| / (L - 1)``, a magnitude score that direct and indirect effects
  cancelling in the plain gradient cannot hide. Costs ``L`` extra backward passes.

The result has the columns of :class:`~vlm_probe.analyses.patching.PatchingResult` (``value``
is the estimated metric after the patch, so ``normalized`` and the plots mean the same as a
sweep's) plus ``estimate`` (``value - corrupt``), ``method`` (``atp`` or ``atp_qk``) and
``graddrop``; :meth:`AttributionResult.confirm` runs exact patching on the cells it ranks first.
Only activations get gradients (parameters are frozen during the run, their flags restored);
it runs with ``device_map`` dispatch (the backward pass follows the forward's devices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions import sites as S
from ..interventions.objects import variant_from_json
from ..interventions.positions import PositionSpec, resolve_positions
from ..model.inputs import Batch
from . import metrics as M
from .attention_fix import AttentionCall, key_column_effects, key_group_effect, query_row_effects
from .batched import metric_index
from .engine import Variant
from .gradients import GradientRun, Pair, gradient_run, source_run
from .options import RunOptions
from .parallel import gather_frame, shard_indices
from .patching import Cell, PatchingResult, _as_list, _cells, _layers_meta, _patching_frame, check_paired

CORRECTIONS = ("qk",)


class AttributionResult(PatchingResult):
    """Estimated patching effects per (sample, site, layer, positions): the columns of a
    :class:`~vlm_probe.analyses.patching.PatchingResult` plus ``estimate`` (estimated change of
    the metric), ``method`` (``atp``: gradient x difference; ``atp_qk``: attention recomputed
    for a query or key site) and, with GradDrop, ``graddrop`` (its magnitude score)."""

    kind = "attribution"

    def plot(self, value: str | None = None, **kwargs: Any) -> Any:
        """Heatmap of the mean estimate, layers x positions (as :meth:`PatchingResult.plot`)."""
        from .plots import patching_figure

        metric = self.frame["metric"].iloc[0] if len(self.frame) else ""
        kwargs.setdefault("title", f"Attribution estimate ({metric}, {value or 'value'})")
        return patching_figure(self, value=value or "value", **kwargs)

    def ranking(self, by: str | None = None) -> pd.DataFrame:
        """Cells ranked by ``by``: the mean over samples of ``|estimate|`` (default) or of the
        ``graddrop`` score; one row per cell with ``score`` and ``rank`` (1 = largest)."""
        by = by or "estimate"
        if by not in self.frame:
            raise InputError(f"No column {by!r} to rank by; use 'estimate' or 'graddrop' (run with graddrop=True).")
        keys = [c for c in ("receiver", "donor") if c in self.frame] + ["cell", "site", "layer", "unified_layer",
                                                                      "positions", "variant"]
        frame = self.frame.assign(score=self.frame[by].abs())
        table = frame.groupby(keys, sort=False).agg(score=("score", "mean"), estimate=("estimate", "mean"))
        table = table.reset_index()
        table = table.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
        table["rank"] = range(1, len(table) + 1)
        return table

    def confirm(
        self,
        vlm: Any,
        clean: Batch,
        corrupt: Batch | None = None,
        *,
        metric: Any = None,
        donor: Any = None,
        direction: tuple[str, str] | None = None,
        k: int = 10,
        by: str | None = None,
        options: RunOptions | None = None,
        **legacy: Any,
    ) -> PatchingResult:
        """Exact patching (the engine, as :func:`~vlm_probe.analyses.sweep` runs it) of the
        ``k`` cells this result ranks first.

        Args:
            vlm: the model patched into (the receiver of a cross-checkpoint result).
            clean: the source batch (the one batch of a cross-checkpoint result).
            corrupt: the batch patched into (default: ``clean``).
            metric: the metric the attribution used (same name; default ``restored()``).
            donor: the checkpoint the activations come from (default: ``vlm``).
            direction: ``(receiver, donor)`` names, when the result holds both directions.
            by: what to rank by (see :meth:`ranking`).
            options: as for ``sweep`` (``progress=`` and the other keywords work too).

        Returns:
            A :class:`PatchingResult` of the ``k`` cells (their ``cell`` ids as here) with the
            exact ``value`` and this result's ``attribution`` (estimated value), ``estimate``
            and ``rank``.
        """
        metric = metric or M.restored()
        names = set(self.frame["metric"])
        if names and metric.name not in names:
            raise InputError(f"This attribution used metric {sorted(names)}; confirm() got {metric.name!r}.")
        ranking = self.ranking(by)
        frame = self.frame
        if "receiver" in ranking:
            pairs = set(zip(ranking["receiver"], ranking["donor"]))
            if direction is None and len(pairs) > 1:
                raise InputError(f"This result holds the directions {sorted(pairs)}: pass direction=(receiver, donor).")
            direction = direction or next(iter(pairs))
            ranking = ranking[(ranking["receiver"] == direction[0]) & (ranking["donor"] == direction[1])]
            frame = frame[(frame["receiver"] == direction[0]) & (frame["donor"] == direction[1])]
        top = ranking.head(k)
        cells = []
        for row in top.itertuples():
            (patch,) = variant_from_json(row.variant)
            cells.append(Cell(patch.site, patch.layer, row.positions, patch.positions))
        options = RunOptions.resolve(options, legacy, "confirm")
        extra = {"receiver": direction[0], "donor": direction[1]} if direction else {}
        exact = _patching_frame(vlm, donor if donor is not None else vlm, clean, clean if corrupt is None else corrupt,
                                [], None, None, metric, options, "confirming", extra, cells=cells)
        exact["cell"] = exact["cell"].map(dict(enumerate(top["cell"])))
        estimated = frame[["cell", "sample", "value", "estimate"]].rename(columns={"value": "attribution"})
        exact = exact.merge(estimated, on=["cell", "sample"], how="left")
        exact["rank"] = exact["cell"].map(dict(zip(top["cell"], top["rank"])))
        meta = {**self.meta, "analysis": "confirm", "k": k, "ranked_by": by or "estimate", "options": options.record()}
        return PatchingResult(exact.sort_values(["rank", "sample"], kind="stable").reset_index(drop=True), meta)


# ----------------------------------------------------------------------------- estimates


def _take(batch: Batch, rows: Sequence[int]) -> Batch:
    """Rows of ``batch`` at its own width (so positions index the same columns)."""
    return batch[list(rows)].padded_to(batch.width)


def _one_column(mask: Tensor) -> bool:
    return bool((mask.sum(1) <= 1).all())


class _Estimator:
    """Per-row estimates of one batch of samples, cached per site (token contributions add)."""

    def __init__(self, vlm: Any, batch: Batch, source: dict[Pair, Tensor], run: GradientRun,
                 source_attention: dict[int, AttentionCall]) -> None:
        self.vlm, self.batch, self.source, self.run = vlm, batch, source, run
        self.source_attention = source_attention
        self._cache: dict[tuple, Tensor] = {}

    def __call__(self, cell: Cell, mask: Tensor | None, qk: bool, grad: int) -> Float[Tensor, " rows"]:
        """Estimated change of the metric per row for ``cell`` with gradient set ``grad``."""
        pair = (cell.site, cell.layer)
        if qk:
            return self._attention(cell, mask, grad)
        contrib = self._contributions(pair, grad)
        if mask is None:
            return contrib
        return (contrib * mask.to(contrib.dtype)).sum(1)

    def _contributions(self, pair: Pair, grad: int) -> Tensor:
        """``(source - receiver) . gradient`` summed over features: ``[rows, seq]`` for token
        sites, ``[rows]`` (each row's units summed) for vision and projector sites."""
        key = ("linear", pair, grad)
        if key not in self._cache:
            base = self.run.activations[pair]
            gradient = self.run.gradients[grad][pair]
            source = self.source[pair].to(base.device)
            if source.shape != base.shape:
                raise InputError(f"{pair[0]!r} of layer {pair[1]} is {tuple(base.shape)} in the receiver but "
                                 f"{tuple(source.shape)} in the source; the runs must have the same layout.")
            product = ((source.float() - base.float()) * gradient.float())
            if S.site(pair[0]).tokens:
                if product.shape[1] != self.batch.width:
                    raise InputError(f"{pair[0]!r} of layer {pair[1]} is {tuple(base.shape)}, not [batch, seq, ...] "
                                     "over this batch's positions (a cross-attention layer's keys and values).")
                value = product.sum(-1).double().cpu()
            else:
                units = product.reshape(product.shape[0], -1).sum(1).double().cpu()
                counts = self.vlm.vision_row_units(self.batch, units.shape[0])
                value = torch.stack([part.sum() for part in units.split(counts)])
            self._cache[key] = value
        return self._cache[key]

    def _attention(self, cell: Cell, mask: Tensor, grad: int) -> Tensor:
        layer = cell.layer
        call = self.run.attention[layer]
        source = self.source_attention[layer]
        g_out = self.run.gradients[grad][("o_in", layer)]
        if cell.site == "q":
            key = ("q", layer, grad)
            if key not in self._cache:
                self._cache[key] = query_row_effects(call, source.query, g_out)
            return (self._cache[key] * mask.double()).sum(1)
        if _one_column(mask):
            key = ("k", layer, grad)
            if key not in self._cache:
                self._cache[key] = key_column_effects(call, source.key, g_out)
            return (self._cache[key] * mask.double()).sum(1)
        return key_group_effect(call, source.key, g_out, mask)


def _attribution_frame(
    receiver: Any,
    donor: Any,
    source_batch: Batch,
    base_batch: Batch,
    sites: list[str],
    layers: Sequence[int] | None,
    positions: Any,
    metric: Any,
    options: RunOptions,
    corrections: Sequence[str],
    graddrop: bool,
    desc: str,
    extra: dict[str, Any],
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Estimates for every cell and sample (this process's share, gathered), and the cost."""
    unknown = set(corrections) - set(CORRECTIONS)
    if unknown:
        raise InputError(f"Unknown corrections {sorted(unknown)}; the one available is 'qk'.")
    mine = shard_indices(len(base_batch), options.backend)
    rows: list[dict[str, Any]] = []
    cost = {"forwards": 0, "backwards": 0, "batches": 0}
    if mine:
        source_part, base_part = _take(source_batch, mine), _take(base_batch, mine)
        cells = _cells(receiver, base_part, sites, layers, positions)
        masks = [resolve_positions(base_part, c.positions, vlm=receiver, what=f"attributing {c.site}")
                 if S.site(c.site).tokens else None for c in cells]
        qk = ["qk" in corrections and c.site in ("q", "k") and receiver.attention_readable(c.layer) for c in cells]
        pairs = list(dict.fromkeys((c.site, c.layer) for c in cells))
        qk_layers = sorted({c.layer for c, fix in zip(cells, qk) if fix})
        taps = pairs + [("o_in", layer) for layer in qk_layers if ("o_in", layer) not in pairs]
        n_passes = 1 + (receiver.n_layers if graddrop else 0)
        estimates = torch.zeros(n_passes, len(cells), len(mine), dtype=torch.float64)
        clean_v = torch.zeros(len(mine), dtype=torch.float64)
        base_v = torch.zeros(len(mine), dtype=torch.float64)
        chunk = max(1, options.max_rows)
        bar = tqdm(total=len(mine), desc=desc, unit="sample", disable=not options.progress)
        for start in range(0, len(mine), chunk):
            local = list(range(start, min(len(mine), start + chunk)))
            samples = torch.tensor([mine[i] for i in local])
            source, base = _take(source_part, local), _take(base_part, local)
            acts, clean_l, source_attention = source_run(donor, source, pairs, metric_index(source, metric.position),
                                                         qk_layers)

            def score(logits: Tensor) -> Tensor:
                return M.score(metric, logits, clean_l.to(logits.device), logits.detach(), samples)

            run = gradient_run(receiver, base, taps, metric_index(base, metric.position), score,
                               attention_layers=qk_layers, graddrop=graddrop)
            base_l = run.logits
            clean_v[local] = M.score(metric, clean_l, clean_l, base_l.to(clean_l.device), samples).double().cpu()
            base_v[local] = run.values.double().cpu()
            estimator = _Estimator(receiver, base, acts, run, source_attention)
            for c, (cell, mask, fix) in enumerate(zip(cells, masks, qk)):
                part = None if mask is None else mask[local]
                for p in range(n_passes):
                    estimates[p, c, local] = estimator(cell, part, fix, p)
            cost["forwards"] += 2
            cost["backwards"] += run.backwards
            cost["batches"] += 1
            bar.update(len(local))
        bar.close()
        scores = (estimates[1:].abs().sum(0) / max(1, receiver.n_layers - 1)) if graddrop else None
        for c, (cell, fix) in enumerate(zip(cells, qk)):
            variant = Variant((cell.intervention("source"),)).to_json()
            for s, sample in enumerate(mine):
                estimate = float(estimates[0, c, s])
                row = {"cell": c, "sample": sample, "site": cell.site, "layer": cell.layer,
                       "unified_layer": S.unified(receiver, cell.site, cell.layer), "positions": cell.label,
                       "metric": metric.name, "value": float(base_v[s]) + estimate, "clean": float(clean_v[s]),
                       "corrupt": float(base_v[s])}
                if metric.normalizable:
                    denom = row["clean"] - row["corrupt"]
                    row["normalized"] = (row["value"] - row["corrupt"]) / denom if abs(denom) > 1e-12 else float("nan")
                row.update(extra, variant=variant, estimate=estimate, method="atp_qk" if fix else "atp")
                if scores is not None:
                    row["graddrop"] = float(scores[c, s])
                rows.append(row)
    return gather_frame(pd.DataFrame(rows), sort=["cell", "sample"], parallel=options.backend), cost


def _meta(options: RunOptions, cost: dict[str, int], **meta: Any) -> dict[str, Any]:
    return {**meta, "cost": cost, "options": options.record()}


def attribution_sweep(
    vlm: Any,
    clean: Batch,
    corrupt: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "vision",
    metric: Any = None,
    corrections: Sequence[str] = CORRECTIONS,
    graddrop: bool = False,
    options: RunOptions | None = None,
    **legacy: Any,
) -> AttributionResult:
    """Estimate :func:`~vlm_probe.analyses.sweep` (clean activations patched into the
    corrupted run) for every cell from gradients: two forwards and one backward pass per batch
    of ``options.max_rows`` samples, whatever the number of cells.

    Args:
        clean, corrupt: as for ``sweep`` (same samples and width).
        site, layers, positions: as for ``sweep`` (``positions="each:vision"``: one cell per
            vision token, for :meth:`~AttributionResult.overlay`).
        metric: a metric differentiable in the logits (default ``restored()``).
        corrections: ``("qk",)`` recomputes the attention pattern for query and key sites;
            ``()`` is plain AtP.
        graddrop: also compute the GradDrop score (one more backward pass per decoder layer).
        options: ``max_rows`` (samples per forward), ``progress``, ``parallel``.
    """
    options = RunOptions.resolve(options, legacy, "attribution_sweep")
    check_paired(clean, corrupt)
    metric = metric or M.restored()
    frame, cost = _attribution_frame(vlm, vlm, clean, corrupt, _as_list(site), layers, positions, metric, options,
                                     tuple(corrections), graddrop, "attribution", {})
    return AttributionResult(frame, _meta(options, cost, analysis="attribution_sweep", metric=metric.name,
                                          sites=_as_list(site), layers=_layers_meta(frame), positions=str(positions),
                                          corrections=list(corrections), graddrop=graddrop, n_samples=len(clean)))


def cross_attribution(
    receiver: Any,
    donor: Any,
    batch: Batch,
    *,
    site: str | Sequence[str] = "layer_out",
    layers: Sequence[int] | None = None,
    positions: PositionSpec | Sequence[PositionSpec] = "all",
    metric: Any = None,
    names: tuple[str, str] = ("receiver", "donor"),
    corrections: Sequence[str] = CORRECTIONS,
    graddrop: bool = False,
    options: RunOptions | None = None,
    **legacy: Any,
) -> AttributionResult:
    """Estimate :func:`~vlm_probe.analyses.cross_patch` (``donor``'s activations put into
    ``receiver``'s run, e.g. RL into IN) for every cell from the receiver's gradients."""
    from ..model.checkpoint_set import check_same_architecture

    options = RunOptions.resolve(options, legacy, "cross_attribution")
    check_same_architecture({names[0]: receiver, names[1]: donor})
    metric = metric or M.restored()
    frame, cost = _attribution_frame(receiver, donor, batch, batch, _as_list(site), layers, positions, metric, options,
                                     tuple(corrections), graddrop, f"attribution {names[1]} -> {names[0]}",
                                     {"receiver": names[0], "donor": names[1]})
    return AttributionResult(frame, _meta(options, cost, analysis="cross_attribution", metric=metric.name,
                                          sites=_as_list(site), layers=_layers_meta(frame), positions=str(positions),
                                          corrections=list(corrections), graddrop=graddrop, receiver=names[0],
                                          donor=names[1]))


def cross_checkpoint_attribution(
    models: Any, batch: Batch, *, a: str = "IN", b: str = "RL", both: bool = True, **kwargs: Any
) -> AttributionResult:
    """:func:`cross_attribution` on a checkpoint set: ``b`` into ``a`` (and ``a`` into ``b``)."""
    first = cross_attribution(models[a], models[b], batch, names=(a, b), **kwargs)
    if not both:
        return first
    second = cross_attribution(models[b], models[a], batch, names=(b, a), **kwargs)
    frame = pd.concat([first.frame, second.frame], ignore_index=True)
    cost = {k: first.meta["cost"][k] + second.meta["cost"][k] for k in first.meta["cost"]}
    return AttributionResult(frame, {**first.meta, "analysis": "cross_checkpoint_attribution", "pair": [a, b],
                                     "cost": cost})
