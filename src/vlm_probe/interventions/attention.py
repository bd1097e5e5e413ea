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

from ..errors import InputError, InterventionError
from ..model.inputs import Batch
from . import sites as site_ops


def _cache_length(cache: Any, layer: int) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except TypeError:
        return int(cache.get_seq_length())


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
    """The attention mask with query->key edges removed.

    Args:
        base: the mask the layer received (bool ``True``=attend, or additive float), ``[B, 1|H, Tq, Tk]``,
            or ``None`` (pure causal).
        queries: ``[batch, total]`` absolute-position mask of query positions; the current
            queries are the last ``n_q`` of the ``n_k`` key positions.
        keys: ``[batch, total]`` absolute-position mask of key positions.
        n_q: number of query positions in this call.
        n_k: number of key positions in this call.
        heads: query heads to knock out (all when ``None``).
        n_heads: the layer's number of query heads.
        dtype: dtype of the layer's activations.
        device: device of the layer's activations.

    Returns:
        A mask of the same kind as ``base`` (bool when ``base`` is ``None``).
    """
    batch = queries.shape[0]

    def window(mask: Tensor, start: int, stop: int) -> Tensor:
        if mask.shape[1] < stop:
            mask = torch.nn.functional.pad(mask, (0, stop - mask.shape[1]))
        return mask[:, start:stop].to(device)

    q = window(queries, n_k - n_q, n_k)  # [B, Tq]
    k = window(keys, 0, n_k)  # [B, Tk]
    blocked = q[:, None, :, None] & k[:, None, None, :]  # [B, 1, Tq, Tk]
    own = torch.arange(n_k - n_q, n_k, device=device)[:, None] == torch.arange(n_k, device=device)[None, :]
    blocked = blocked & ~own  # a token always attends to itself
    if heads is not None:
        selected = torch.zeros(n_heads, dtype=torch.bool, device=device)
        selected[list(heads)] = True
        blocked = blocked & selected[None, :, None, None]
    if base is None:
        idx_q = torch.arange(n_k - n_q, n_k, device=device)[:, None]
        base = (torch.arange(n_k, device=device)[None, :] <= idx_q)[None, None].expand(batch, 1, n_q, n_k)
    if base.dtype == torch.bool:
        return base & ~blocked
    return torch.where(blocked, torch.finfo(base.dtype).min, base)


def knockout(
    vlm: Any,
    layer: int,
    queries: Bool[Tensor, "batch total"],
    keys: Bool[Tensor, "batch total"],
    heads: Sequence[int] | None = None,
) -> None:
    """Block attention edges from ``queries`` to ``keys`` in decoder ``layer``, inside a trace.

    Args:
        queries: ``[batch, total]`` mask of query positions (absolute; ``total`` may exceed
            the prompt to cover generated tokens).
        keys: ``[batch, total]`` mask of key positions.
        heads: query heads to block (default: all).

    A token always keeps attending to itself. In a generation trace, call it at every step.
    """
    sites = vlm.layers[layer]
    if sites.is_cross_attention:
        raise InterventionError(
            f"Decoder layer {layer} is a cross-attention layer; knockout edits self-attention edges. "
            "Block image inputs of a cross-attention layer with its cross_attention_mask instead."
        )
    if heads is not None and any(not 0 <= h < vlm.n_heads for h in heads):
        raise InputError(f"Head indices must lie in 0..{vlm.n_heads - 1}; got {list(heads)}.")
    args, kwargs = sites.attn.inputs
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    n_q = int(hidden.shape[1])
    base = kwargs.get("attention_mask")
    if base is not None:
        n_k = int(base.shape[-1])
    else:
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        n_k = _cache_length(cache, layer) + n_q
    mask = knockout_mask(
        base, queries, keys, n_q, n_k, heads, vlm.n_heads, hidden.dtype, hidden.device
    )
    sites.attn.inputs = (args, {**kwargs, "attention_mask": mask})


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
    layers = sorted(set(layers))
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
    vlm.require_image_positions("the vision key/value swap")
    mask = target.layout.mask("vision")
    if rows is not None:
        mask = mask & rows[:, None]
    for layer in sorted(set(layers)):
        if layer not in source_kv:
            raise InputError(f"No source keys/values for layer {layer}; collect them with vision_kv(...).")
        k, v = source_kv[layer]
        if int(mask.sum()) != k.shape[0]:
            raise InputError(
                f"The target has {int(mask.sum())} vision tokens to swap but the source gives {k.shape[0]}; "
                "source and target must give the same number of vision tokens per row."
            )
        site_ops.edit(vlm, "k", layer, mask, k)
        site_ops.edit(vlm, "v", layer, mask, v)
