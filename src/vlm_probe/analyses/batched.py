"""What the engine reuses between variants: captured runs, the KV-cache prefix, the chunk plan.

A sweep repeats a batch ``k`` times (variants contiguous: ``[s0 .. sB-1] x k``), runs the
vision tower once per distinct image (its output is captured once and replayed through
nnsight's ``skip``), replays the unpatched run's layer outputs below a chunk's shallowest
edit, and, when every edit of a chunk lies at or after column ``start`` and no image token
follows it, reruns only columns ``start:`` on top of the unpatched run's KV cache
(:class:`PrefixCache`): in a causal model nothing before the first edited position can change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import nnsight
import torch
from jaxtyping import Float, Int
from nnsight.util import apply
from torch import Tensor

from ..errors import InputError
from ..interventions import sites as S
from ..model.inputs import Batch, ForwardInputs


def repeat_rows(batch: Batch, k: int) -> Batch:
    """``batch`` repeated ``k`` times with variants contiguous (``[a, b, a, b]`` for k=2)."""
    return Batch(list(batch.rows) * k, batch.collator)


def tile(tensor: Tensor, k: int, dim: int = 0) -> Tensor:
    """``tensor`` repeated ``k`` times along ``dim`` (variants contiguous)."""
    return torch.cat([tensor] * k, dim=dim) if k > 1 else tensor


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + max(1, size)]


def _snapshot(value: Any) -> Any:
    """A structural copy (tensors shared) that later in-place edits of the original do not reach."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, dict):
        out = copy.copy(value)
        for key in list(value.keys()):
            out[key] = _snapshot(value[key])
        return out
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_snapshot(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def plan_chunks(starts: Sequence[int], layers: Sequence[int], rows: int, width: int, n_layers: int,
                max_cells: int) -> list[range]:
    """Cut cells (sorted by first rerun column, then layer) into consecutive chunks that
    minimise the recomputed work.

    A chunk of ``c`` cells reruns ``c * rows`` rows over columns ``start:`` of the layers from
    its shallowest cell up; each forward also costs a fixed overhead, counted as one layer of
    the unrepeated rows (``rows * width``). Exact by dynamic programming, at most
    ``max_cells`` cells per chunk.

    Returns:
        ``range`` s of cell indices, in order.
    """
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise InputError("plan_chunks needs the cells sorted by their first rerun column.")
    m = len(starts)
    best = [0.0] + [float("inf")] * m
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        shallowest = n_layers
        for i in range(j - 1, max(-1, j - 1 - max_cells), -1):
            shallowest = min(shallowest, layers[i])
            # starts ascend, so the chunk's first cell has its first rerun column
            cost = best[i] + (j - i) * rows * (width - starts[i]) * (n_layers - shallowest) + rows * width
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out: list[range] = []
    j = m
    while j:
        out.append(range(cut[j], j))
        j = cut[j]
    return out[::-1]


@dataclass
class VisionOutput:
    """The vision tower's output for one batch, replayable for the batch repeated ``k`` times."""

    value: Any

    def tiled(self, k: int) -> Any:
        """A fresh structure with every tensor repeated ``k`` times along its first dimension."""
        return apply(_snapshot(self.value), lambda t: tile(t, k), Tensor)


@dataclass
class PrefixCache:
    """A run's keys and values at every position, from which a chunk can rerun only a suffix."""

    layers: list[tuple[Tensor, Tensor]]  #: per decoder layer ([batch, kv_heads, seq, head_dim]) x 2
    position_ids: Tensor | None  #: what the language model received (``[..., batch, seq]``), or None

    def positions(self, batch: Batch) -> Tensor:
        """The language model's position ids (mask-derived where the model made them itself)."""
        if self.position_ids is not None:
            return self.position_ids
        return (batch.inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)

    def cache(self, vlm: Any, start: int, k: int) -> Any:
        """A fresh KV cache of columns ``:start``, for the batch repeated ``k`` times."""
        from transformers import DynamicCache

        return DynamicCache([(tile(key[..., :start, :], k), tile(value[..., :start, :], k))
                             for key, value in self.layers], config=vlm.hf.config)

    def continuation(self, vlm: Any, batch: Batch, start: int, k: int) -> tuple[ForwardInputs, Any]:
        """Inputs that run columns ``start:`` of ``batch`` repeated ``k`` times over this cache
        (and the cache, for edits before the run)."""
        cache = self.cache(vlm, start, k)
        kwargs = {"input_ids": tile(batch.inputs["input_ids"][:, start:], k),
                  "attention_mask": tile(batch.inputs["attention_mask"], k),
                  "position_ids": tile(self.positions(batch)[..., start:], k, dim=-2),
                  vlm.cache_argument: cache, "use_cache": True}
        return ForwardInputs(kwargs, rows=k * len(batch)), cache

    def fill(self, cache: Any, layers: Iterable[int], start: int, k: int) -> None:
        """Append this run's columns ``start:`` to ``layers`` of ``cache`` (layers a chunk
        replayed instead of running, so a generation can continue over them)."""
        for layer in layers:
            key, value = self.layers[layer]
            cache.layers[layer].update(tile(key[..., start:, :], k), tile(value[..., start:, :], k))


def cache_argument(vlm: Any) -> str:
    """The forward's name for the KV cache (``cache`` since transformers 5.2x, else ``past_key_values``)."""
    return vlm.cache_argument


def suffix_start(vlm: Any, batch: Batch, masks: Iterable[Tensor], metric_positions: Tensor) -> int:
    """First column a chunk must rerun: its first edited position, or 0 when an image token
    (or a non-causal family) would make a suffix run inexact."""
    start = int(metric_positions.min())
    for mask in masks:
        columns = mask.any(0).nonzero()
        if len(columns):
            start = min(start, int(columns[0]))
    return start if vlm.suffix_rerun_valid(batch, start) else 0


@dataclass
class Capture:
    """What one plain forward of a batch yields for the engine."""

    activations: dict[tuple[str, int], Tensor] = field(default_factory=dict)  #: (site, index) -> activation
    logits: Tensor | None = None  #: [batch, vocab] at the readout position (or [batch, seq, vocab])
    vision: VisionOutput | None = None
    cache: PrefixCache | None = None
    start: int = 0  #: token-site activations hold columns ``start:``


def capture(
    vlm: Any,
    batch: Batch,
    sites: Iterable[tuple[str, int]] = (),
    logits_index: tuple[Tensor, Tensor] | None = None,
    vision: bool = False,
    cache: bool = False,
    start: int = 0,
) -> Capture:
    """One forward of ``batch`` saving site activations, the logits and the vision output.

    Args:
        sites: ``(site, index)`` pairs to save (token sites keep columns ``start:``).
        logits_index: ``(rows, positions)`` to index the logits with (all logits when None).
        vision: also capture the vision tower's output for replay.
        cache: also keep the KV cache (None when the family is not causal or a layer's
            cache does not hold every position, e.g. a sliding window shorter than the batch).
    """
    ordered = list(dict.fromkeys(sites))
    has_images = bool(batch.layout.mask("vision").any())
    cache = cache and vlm.causal_text
    snap = past = positions = None  # values leave a trace only when saved: define the fallbacks outside
    options: dict[str, Any] = {"use_cache": cache}
    if logits_index is not None:
        keep, column = keep_logits(logits_index[1])
        options["logits_to_keep"] = keep
        logits_index = (logits_index[0], column)
    with torch.no_grad(), vlm.trace(**options) as tracer:
        with tracer.invoke(batch):
            if cache:
                positions = nnsight.save(vlm.language_model.inputs[1].get("position_ids"))
            out = vlm.lm_head.output
            logits = (out[logits_index[0], logits_index[1]] if logits_index is not None else out).save()
            if cache:
                past = nnsight.save(vlm.output_cache(vlm.output))
        if vision and has_images:
            with tracer.invoke():  # its own invoke: the tower's output comes before or after the projector
                snap = nnsight.save(_snapshot(vlm.vision.root.output))
        if ordered:
            acts = S.read_many(vlm, tracer, ordered, start)
    prefix = None
    if past is not None:
        layers = [(layer.keys, layer.values) for layer in past.layers]
        # mRoPE positions come only from the model; without them a suffix run would be inexact
        if all(key.shape[-2] == batch.width for key, _ in layers) and (positions is not None
                                                                       or not vlm.positions_from_model):
            prefix = PrefixCache(layers, positions)
    return Capture(dict(zip(ordered, acts)) if ordered else {}, logits,
                   VisionOutput(snap) if snap is not None else None, prefix, start)


def keep_logits(positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits_to_keep, column)``: the distinct positions to compute logits for, and for each
    row the column of its position among them (HF models take ``logits_to_keep`` as indices)."""
    keep, column = torch.unique(positions, sorted=True, return_inverse=True)
    return keep, column


def metric_index(batch: Batch, position: str | int, k: int = 1) -> tuple[Int[Tensor, " rows"], Int[Tensor, " rows"]]:
    """``(rows, positions)`` of the metric position for ``batch`` repeated ``k`` times."""
    if isinstance(position, int):
        pos = [position % batch.width] * len(batch)
    else:
        pos = []
        for row in batch.layout:
            span = row.spans[position]
            if len(span) != 1:
                raise InputError(f"The metric position must name one token per row; {position!r} has {len(span)}.")
            pos.append(span[0])
    positions = torch.tensor(pos * k, dtype=torch.long)
    return torch.arange(len(positions)), positions


def answer_index(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    """``(rows, prediction positions, target ids)`` of every teacher-forced answer token."""
    rows, pos, ids = [], [], []
    input_ids = batch.inputs["input_ids"]
    for r, layout in enumerate(batch.layout):
        answer = layout.spans["answer"]
        if not answer:
            raise InputError("level='logprob' needs teacher-forced answers: prepare the batch with answers=[...].")
        for p in answer:
            rows.append(r)
            pos.append(p - 1)
            ids.append(int(input_ids[r, p]))
    return torch.tensor(rows), torch.tensor(pos), torch.tensor(ids)


def sum_by_row(values: Float[Tensor, " n"], rows: Tensor, n_rows: int) -> Float[Tensor, " rows"]:
    return torch.zeros(n_rows).index_add_(0, rows, values.float().cpu())
