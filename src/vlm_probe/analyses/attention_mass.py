"""Attention mass: how much of a query group's attention goes to a key group, per layer and head.

The weights are recomputed from the queries and keys that the attention layer hands to its
attention function (read with nnsight's ``.source``, after the rotary embedding and, during
generation, with the cached keys), chunk by chunk over the query rows. So the model keeps its
fast attention backend (sdpa), memory grows linearly with the sequence per chunk, and the
values equal the eager attention weights (tested to 1e-5 on every family).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import nnsight
import pandas as pd
import plotly.graph_objects as go
import torch
from einops import repeat
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError, SpecMismatchError
from ..interventions.positions import PositionSpec, positions_label, resolve_positions
from ..model.inputs import Batch
from ..results import Result
from .generation import fixed_steps, generation_defaults, greedy_config

_CALL = re.compile(r"(?<![\w.])attention_interface\(")


@lru_cache(maxsize=None)
def _interface_name(names: tuple[str, ...], source: str, lines: tuple[tuple[str, int], ...]) -> str:
    text = source.split("\n")
    line_of = dict(lines)
    calls = [n for n in names if n.startswith("attention_interface_") and _CALL.search(text[line_of[n] - 1])]
    if len(calls) != 1:
        raise SpecMismatchError(
            f"Cannot find the attention-function call in this attention module's forward (candidates: {calls}); "
            "attention mass needs the transformers attention interface."
        )
    return calls[0]


def attention_call(attn_envoy: Any) -> Any:
    """The nnsight source operation of the ``attention_interface(...)`` call of an attention module.

    Resolved by inspecting the forward's source (operation labels are positional and change
    between versions, so they are never hard-coded).
    """
    compiled = attn_envoy.source.compiled
    name = _interface_name(tuple(compiled.names), compiled.source, tuple(sorted(compiled.lines.items())))
    return getattr(attn_envoy.source, name)


def attention_rows(
    query: Float[Tensor, "batch heads q dim"],
    key: Float[Tensor, "batch kv_heads k dim"],
    mask: Tensor | None,
    scaling: float,
    rows: Tensor,
    softcap: float | None = None,
) -> Float[Tensor, "batch heads r k"]:
    """Attention weights of the query rows ``rows`` (indices into the ``q`` axis), exactly as
    eager attention computes them (grouped key heads repeated, additive or boolean mask)."""
    n_q, n_k = query.shape[2], key.shape[2]
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads != kv_heads:
        key = repeat(key, "b h k d -> b (h g) k d", g=heads // kv_heads)
    scores = torch.matmul(query[:, :, rows].float(), key.float().transpose(-1, -2)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:  # causal: query i (absolute n_k - n_q + i) sees keys up to itself
        absolute = (n_k - n_q + rows.to(scores.device))[:, None]
        allowed = torch.arange(n_k, device=scores.device)[None, :] <= absolute
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
) -> tuple[Float[Tensor, "batch heads"], Tensor]:
    """Summed attention (per row and head) of the selected query rows on the selected keys,
    and the number of selected query rows per batch row."""
    args, kwargs = inputs  # attention_interface(module, query, key, value, attention_mask, **kw)
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
        weights = attention_rows(query, key, mask, float(scaling), rows, softcap)  # [B, H, r, K]
        on_keys = (weights * key_mask[:, None, None, :]).sum(-1)  # [B, H, r]
        selected = queries[:, rows].to(on_keys.device).float()  # [B, r]
        total += (on_keys * selected[:, None, :]).sum(-1).cpu()
    return total, queries.sum(1)


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
        chosen = [l for l in (range(vlm.n_layers) if layers is None else layers) if not vlm.layers[l].is_cross_attention]
        key_mask = resolve_positions(batch, keys, vlm=vlm, what="attention mass keys")
        bar = tqdm(total=len(chosen), desc=f"attention mass {name}", disable=not progress, unit="layer")
        if generated:
            totals, counts = _generated_mass(vlm, batch, key_mask, chosen, max_new_tokens, chunk)
        else:
            query_mask = resolve_positions(batch, queries, vlm=vlm, what="attention mass queries")
            calls = [attention_call(vlm.layers[l].attn) for l in chosen]
            with torch.no_grad(), vlm.trace(batch):
                inputs = nnsight.save([call.inputs for call in calls])
            totals, counts = {}, None
            for layer, inp in zip(chosen, inputs):
                totals[layer], counts = mass_from_call(inp, query_mask, key_mask, chunk)
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
    vlm: Any, batch: Batch, key_mask: Tensor, layers: list[int], steps: int, chunk: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Attention of each generated token (greedy, ``steps`` tokens) on the prompt's key group."""
    config = fixed_steps(greedy_config(vlm, steps))  # every step must happen for the loop below
    calls = [attention_call(vlm.layers[l].attn) for l in layers]
    with torch.no_grad(), generation_defaults(vlm.hf, config), \
            vlm.generate(batch, generation_config=config) as tracer:
        per_step = nnsight.save([])
        for _ in tracer.iter[1:steps]:
            per_step.append([call.inputs for call in calls])
    totals = {layer: torch.zeros(len(batch), vlm.n_heads) for layer in layers}
    counts = torch.zeros(len(batch))
    for step_inputs in per_step:
        for layer, inp in zip(layers, step_inputs):
            n_k = inp[0][2].shape[2]
            q = torch.ones(len(batch), 1, dtype=torch.bool)
            k = torch.zeros(len(batch), n_k, dtype=torch.bool)
            k[:, : key_mask.shape[1]] = key_mask
            mass, _ = mass_from_call(inp, q, k, chunk)
            totals[layer] += mass
        counts += 1
    return totals, counts


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
    chosen = [l for l in (range(vlm.n_layers) if layers is None else layers) if not vlm.layers[l].is_cross_attention]
    query_mask = resolve_positions(batch, queries, vlm=vlm, what="attention queries")
    calls = [attention_call(vlm.layers[l].attn) for l in chosen]
    with torch.no_grad(), vlm.trace(batch):
        inputs = nnsight.save([call.inputs for call in calls])
    total = torch.zeros(batch.inputs["input_ids"].shape, dtype=torch.float64)
    for inp in inputs:
        args, kwargs = inp
        query, key = args[1], args[2]
        mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
        scaling = float(kwargs.get("scaling") or query.shape[-1] ** -0.5)
        rows = torch.nonzero(query_mask.any(0)).flatten()
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            weights = attention_rows(query, key, mask, scaling, part, kwargs.get("softcap"))  # [B, H, r, K]
            selected = query_mask[:, part].to(weights.device).double()
            total += (weights.double().mean(1) * selected[:, :, None]).sum(1).cpu()
    return (total / (query_mask.sum(1, keepdim=True).double() * max(1, len(chosen)))).float()
