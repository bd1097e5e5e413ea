"""Attention mass: how much of a query group's attention goes to a key group, per layer and head.

The weights are recomputed from the queries and keys that the attention layer hands to its
attention function (the wrapper's :meth:`~vlm_probe.VLM.attention_call`, found at load time:
after the rotary embedding and, during generation, with the cached keys), chunk by chunk over
the query rows, and reduced inside the trace layer by layer. So the model keeps its fast
attention backend (sdpa), memory holds one layer's queries and keys at a time and grows
linearly with the sequence per chunk, and the values equal the eager attention weights (tested
to 1e-5 on every family). Query and key positions are the calls' absolute columns, read from
the cache layout (:meth:`~vlm_probe.VLM.attention_columns`): during generation a sliding-window
layer's key column j is not position j.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import pandas as pd
import plotly.graph_objects as go
import torch
from einops import repeat
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions.positions import PositionSpec, column_mask, positions_label, resolve_positions
from ..model.inputs import Batch
from ..results import Result
from .generation import fixed_steps, generation_defaults, greedy_config

def attention_rows(
    query: Float[Tensor, "batch heads q dim"],
    key: Float[Tensor, "batch kv_heads k dim"],
    mask: Tensor | None,
    scaling: float,
    rows: Tensor,
    softcap: float | None = None,
    columns: tuple[Tensor, Tensor] | None = None,
) -> Float[Tensor, "batch heads r k"]:
    """Attention weights of the query rows ``rows`` (indices into the ``q`` axis), exactly as
    eager attention computes them (grouped key heads repeated, additive or boolean mask).

    Args:
        columns: absolute columns of the queries and keys (for the causal rule when ``mask``
            is ``None``); default: the queries are the last of the keys.
    """
    n_q, n_k = query.shape[2], key.shape[2]
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = repeat(key, "b h k d -> b (h g) k d", g=heads // kv_heads)
    scores = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # causal: a query sees the keys up to its own column
        q_cols, k_cols = columns if columns is not None else (torch.arange(n_k - n_q, n_k), torch.arange(n_k))
        allowed = k_cols.to(scores.device)[None, :] <= q_cols.to(scores.device)[rows.to(scores.device)][:, None]
        scores = scores.masked_fill(~allowed[None, None], float("-inf"))
    else:
        part = mask[:, :, rows.to(mask.device), :n_k]
        if part.dtype == torch.bool:
            scores = scores.masked_fill(~part, float("-inf"))
        else:
            scores = scores + part.float()
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def mass_from_call(
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    queries: Bool[Tensor, "batch q"],
    keys: Bool[Tensor, "batch k"],
    chunk: int,
    columns: tuple[Tensor, Tensor] | None = None,
) -> tuple[Float[Tensor, "batch heads"], Tensor]:
    """Summed attention (per row and head) of the selected query rows on the selected keys,
    and the number of selected query rows per batch row.

    Args:
        inputs: the ``(args, kwargs)`` of an ``attention_interface(module, query, key, value, mask, ...)`` call.
        queries: ``[batch, q]`` which of the call's queries count.
        keys: ``[batch, k]`` which of the call's keys count.
        columns: the absolute columns of the call's queries and keys.
    """
    args, kwargs = inputs
    query, key = args[1], args[2]
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    scaling = kwargs.get("scaling") or getattr(args[0], "scaling", query.shape[-1] ** -0.5)
    softcap = kwargs.get("softcap")
    batch, heads = query.shape[0], query.shape[1]
    total = torch.zeros(batch, heads)
    any_rows = torch.nonzero(queries.any(0)).flatten()
    key_mask = keys[:, : key.shape[2]].to(query.device).float()
    for start in range(0, len(any_rows), chunk):
        rows = any_rows[start : start + chunk]
        weights = attention_rows(query, key, mask, float(scaling), rows, softcap, columns)  # [B, H, r, K]
        on_keys = (weights * key_mask[:, None, None, :]).sum(-1)  # [B, H, r]
        selected = queries[:, rows].to(on_keys.device).float()  # [B, r]
        total += (on_keys * selected[:, None, :]).sum(-1).cpu()
    return total, queries.sum(1)


def _call_mass(vlm: Any, layer: int, batch: Batch, queries: PositionSpec, keys: PositionSpec,
               chunk: int) -> tuple[Tensor, Tensor]:
    """Inside a trace: the attention mass of decoder ``layer``'s call, reduced at once (so memory
    holds one layer's queries and keys at a time); positions are the call's absolute columns."""
    args, kwargs = vlm.layers[layer].attn.inputs
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    base = kwargs.get("attention_mask")
    columns = vlm.attention_columns(layer, kwargs, int(hidden.shape[1]), None if base is None else int(base.shape[-1]))
    q = column_mask(batch, queries, columns[0], vlm=vlm, what="attention mass queries")
    k = column_mask(batch, keys, columns[1], vlm=vlm, what="attention mass keys")
    return mass_from_call(vlm.attention_call(layer).inputs, q, k, chunk, columns)


class AttentionMassResult(Result):
    """Share of a query group's attention on a key group, per checkpoint, layer, head and sample.

    Columns: ``checkpoint``, ``sample``, ``layer`` (0-based), ``unified_layer``, ``head``,
    ``queries``, ``keys``, ``mass`` (mean over the group's query tokens of the attention they put
    on the key group).
    """

    kind = "attention_mass"

    def by_layer(self) -> pd.DataFrame:
        """Mean over heads and samples per checkpoint and layer."""
        return self.frame.groupby(["checkpoint", "layer", "unified_layer"], sort=True)["mass"].mean().reset_index()

    def difference(self, a: str, b: str) -> pd.DataFrame:
        """Per layer (and head) ``b - a`` (e.g. RL minus IN), paired over samples, with 95% CIs."""
        from ..stats import paired_difference

        frame = self.frame
        rows = []
        for layer, part in frame.groupby("layer", sort=True):
            per_sample = part.groupby(["checkpoint", "sample"])["mass"].mean().unstack(0)
            est = paired_difference(per_sample[a].to_numpy(), per_sample[b].to_numpy())
            rows.append({"layer": layer, "unified_layer": layer + 1, "difference": est.value, "low": est.low,
                         "high": est.high, "n": est.n})
        return pd.DataFrame(rows)

    def plot(self, **kwargs: Any) -> go.Figure:
        from .plots import layer_curves

        frame = self.frame.groupby(["checkpoint", "sample", "unified_layer"])["mass"].mean().reset_index()
        q, k = self.meta.get("queries"), self.meta.get("keys")
        return layer_curves(frame, "mass", series="checkpoint", title=kwargs.get("title", f"Attention mass {q} -> {k}"),
                            y_title="attention mass")


def attention_mass(
    models: Any,
    batch: Batch,
    *,
    queries: PositionSpec = "last",
    keys: PositionSpec = "vision",
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 0,
    chunk: int = 64,
    progress: bool = True,
) -> AttentionMassResult:
    """Attention mass from ``queries`` to ``keys`` for each checkpoint, layer and head.

    Args:
        models: a :class:`~vlm_probe.VLM` or a mapping name -> VLM (a checkpoint set).
        queries: query positions (a group, positions or mask), or ``"generated"``: the tokens
            generated greedily for ``max_new_tokens`` steps (each generated token's attention).
        keys: key positions in the prompt (e.g. ``"vision"``).
        layers: 0-based decoder layers (default: every self-attention layer).
        chunk: query rows per recomputation chunk (memory ~ chunk x heads x sequence).
    """
    named = dict(models) if isinstance(models, dict) or hasattr(models, "items") else {"model": models}
    rows_out: list[dict[str, Any]] = []
    generated = queries == "generated"
    if generated and max_new_tokens < 1:
        raise InputError("queries='generated' needs max_new_tokens >= 1.")
    for name, vlm in named.items():
        chosen = [l for l in vlm.layer_indices(layers) if not vlm.layers[l].is_cross_attention]
        resolve_positions(batch, keys, vlm=vlm, what="attention mass keys")  # refuse image keys where they are empty
        bar = tqdm(total=len(chosen), desc=f"attention mass {name}", disable=not progress, unit="layer")
        if generated:
            totals, counts = _generated_mass(vlm, batch, keys, chosen, max_new_tokens, chunk)
        else:
            with torch.no_grad(), vlm.trace(batch):
                reduced = nnsight.save([_call_mass(vlm, layer, batch, queries, keys, chunk) for layer in chosen])
            totals = {layer: mass for layer, (mass, _) in zip(chosen, reduced)}
            counts = reduced[0][1] if reduced else torch.zeros(len(batch))
        for layer in chosen:
            mass = totals[layer] / counts.clamp_min(1)[:, None].float()
            for s in range(mass.shape[0]):
                for h in range(mass.shape[1]):
                    rows_out.append({"checkpoint": name, "sample": s, "layer": layer, "unified_layer": layer + 1,
                                     "head": h, "queries": positions_label(queries), "keys": positions_label(keys),
                                     "mass": float(mass[s, h])})
            bar.update(1)
        bar.close()
    return AttentionMassResult(pd.DataFrame(rows_out), {"queries": positions_label(queries),
                                                        "keys": positions_label(keys), "checkpoints": list(named),
                                                        "max_new_tokens": max_new_tokens})


def _generated_mass(
    vlm: Any, batch: Batch, keys: PositionSpec, layers: list[int], steps: int, chunk: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Attention of each generated token (greedy, ``steps`` tokens) on the prompt's key group,
    with key columns read from the cache layout at every step (sliding windows included)."""
    config = fixed_steps(greedy_config(vlm, steps))  # every step must happen for the loop below
    with torch.no_grad(), generation_defaults(vlm.hf, config), \
            vlm.generate(batch, generation_config=config) as tracer:
        sums = nnsight.save([torch.zeros(len(batch), vlm.n_heads) for _ in layers])
        for _ in tracer.iter[1:steps]:
            for i, layer in enumerate(layers):
                sums[i] = sums[i] + _call_mass(vlm, layer, batch, "generated", keys, chunk)[0]
    totals = dict(zip(layers, sums))
    return totals, torch.full((len(batch),), float(max(steps - 1, 0)))


def token_attention(
    vlm: Any,
    batch: Batch,
    *,
    queries: PositionSpec = "last",
    layers: Sequence[int] | None = None,
    chunk: int = 64,
) -> Float[Tensor, "batch seq"]:
    """Attention each key position receives from the query group, averaged over the query
    tokens, heads and ``layers`` (recomputed as in :func:`attention_mass`); ``[batch, seq]``.
    Draw it over the image with ``overlay_figure(image, layout, values[row, layout.vision])``."""
    chosen = [l for l in vlm.layer_indices(layers) if not vlm.layers[l].is_cross_attention]
    query_mask = resolve_positions(batch, queries, vlm=vlm, what="attention queries")
    rows = torch.nonzero(query_mask.any(0)).flatten()

    def per_key(layer: int) -> Tensor:  # inside the trace: one layer's weights at a time
        args, kwargs = vlm.attention_call(layer).inputs
        query, key = args[1], args[2]
        mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
        scaling = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        total = torch.zeros(query_mask.shape, dtype=torch.float64)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            weights = attention_rows(query, key, mask, scaling, part, kwargs.get("softcap"))  # [B, H, r, K]
            selected = query_mask[:, part].to(weights.device).double()
            total += (weights.double().mean(1) * selected[:, :, None]).sum(1).cpu()
        return total

    with torch.no_grad(), vlm.trace(batch):
        per_layer = nnsight.save([per_key(layer) for layer in chosen])
    total = sum(per_layer, torch.zeros(query_mask.shape, dtype=torch.float64))
    return (total / (query_mask.sum(1, keepdim=True).double() * max(1, len(chosen)))).float()
