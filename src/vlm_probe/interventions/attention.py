"""Attention-level interventions: edge knockout and the vision-token key/value swap.

Both work under eager and sdpa attention and during generation, without switching the
model's attention implementation and without patching any forward.

* :func:`knockout` rewrites the attention mask a decoder layer's attention receives, so that
  chosen query positions cannot read chosen key positions (optionally for some heads only).
* :func:`swap_vision_kv` replaces the keys and values that a target image's vision tokens
  write into the cache with those of a source image (the published vision-localization
  probe). Keys are swapped before the rotary embedding; with one layout for source and
  target this equals swapping the cached keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import nnsight
import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch
from . import objects
from . import sites as site_ops
from .positions import PositionSpec, column_mask


def knockout_mask(
    base: Tensor | None,
    queries: Bool[Tensor, "batch total"],
    keys: Bool[Tensor, "batch total"],
    n_q: int,
    n_k: int,
    heads: Sequence[int] | None,
    n_heads: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """The attention mask with query->key edges removed, for a call whose ``n_k`` keys are
    absolute columns ``0..n_k-1`` and whose queries are the last ``n_q`` of them (a full
    cache; :class:`~vlm_probe.interventions.Knockout` finds the columns from the cache layout).

    Args:
        base: the mask the layer received (bool ``True``=attend, or additive float), ``[B, 1|H, Tq, Tk]``,
            or ``None`` (pure causal).
        queries: ``[batch, total]`` absolute-position mask of query positions.
        keys: ``[batch, total]`` absolute-position mask of key positions.
        heads: query heads to knock out (all when ``None``).

    Returns:
        A mask of the same kind as ``base`` (bool when ``base`` is ``None``).
    """
    q_cols, k_cols = torch.arange(n_k - n_q, n_k), torch.arange(n_k)
    q = column_mask(None, queries, q_cols)
    k = column_mask(None, keys, k_cols)
    return objects.knockout_mask(base, q, k, q_cols, k_cols, heads, n_heads, slice(None), queries.shape[0], device)


def knockout(
    vlm: Any,
    layer: int,
    queries: PositionSpec,
    keys: PositionSpec,
    heads: Sequence[int] | None = None,
    batch: Batch | None = None,
) -> None:
    """Block attention edges from ``queries`` to ``keys`` in decoder ``layer``, inside a trace
    (``Knockout(layer, queries, keys, heads).apply(vlm, batch)``).

    Args:
        queries: ``[batch, total]`` mask of query positions (absolute columns of the padded
            batch; ``total`` may exceed the prompt to cover generated tokens), or with
            ``batch`` given a position spec (a group, ``"generated"``, ...).
        keys: ``[batch, total]`` mask of key positions (or a spec with ``batch``).
        heads: query heads to block (default: all).

    A token always keeps attending to itself. In a generation trace, call it at every step:
    positions come from the cache layout, so sliding-window layers are edited correctly.
    """
    objects.Knockout(layer, queries, keys, None if heads is None else tuple(heads)).apply(vlm, batch)


# ----------------------------------------------------------------------------- vision kv swap


def vision_kv(
    vlm: Any, batch: Batch, layers: Iterable[int]
) -> dict[int, tuple[Tensor, Tensor]]:
    """Keys and values (pre-RoPE projections) of ``batch``'s vision tokens at ``layers``.

    Returns:
        ``{layer: (k, v)}`` with ``k``/``v`` of shape ``[n_vision_tokens_total, kv_dim]``
        (the batch's vision positions in row-major order). One forward.
    """
    vlm.require_image_positions("the vision key/value swap")
    layers = sorted(set(vlm.layer_indices(layers)))
    mask = batch.layout.mask("vision")
    with torch.no_grad(), vlm.trace(batch):
        saved = nnsight.save(
            [(site_ops.read(vlm, "k", layer)[mask], site_ops.read(vlm, "v", layer)[mask]) for layer in layers]
        )
    return dict(zip(layers, saved))


def check_swap_pair(target: Batch, source: Batch) -> None:
    """Source and target must have the same number of vision tokens in every row."""
    if len(target) != len(source):
        raise InputError(f"{len(target)} target rows but {len(source)} source rows.")
    for i, (t, s) in enumerate(zip(target.layout, source.layout)):
        nt, ns = len(t.spans["vision"]), len(s.spans["vision"])
        if nt != ns:
            raise InputError(
                f"Row {i}: the target image has {nt} vision tokens and the source image {ns}. The swap "
                "replaces token for token, so both images must give the same number of tokens "
                "(use images of the same size)."
            )


def swap_vision_kv(
    vlm: Any,
    target: Batch,
    source_kv: Mapping[int, tuple[Tensor, Tensor]],
    layers: Iterable[int],
    rows: Bool[Tensor, " batch"] | None = None,
) -> None:
    """Replace the target's vision keys/values with the source's at ``layers``, inside a trace.

    Call it at the top level of a generation trace (it then applies to the prefill pass only,
    so the cache holds the swapped entries and decode steps are left alone).

    Args:
        target: the batch this trace runs.
        source_kv: from :func:`vision_kv` on the source batch (same vision-token counts).
        layers: decoder layers to swap (e.g. ``range(L, n_layers)`` for "from L onward").
        rows: restrict the swap to these rows of ``target``.
    """
    layers = sorted(set(layers))
    positions: PositionSpec = "vision"
    if rows is not None:
        positions = target.layout.mask("vision") & rows[:, None]
    objects.SwapKV(tuple(layers), positions).apply(vlm, target, source=dict(source_kv))
