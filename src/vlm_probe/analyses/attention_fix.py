"""The AtP* correction for attention saturation (Kramár et al. 2024, the "QK fix").

Patching a query or a key changes attention logits, and a first-order (gradient) estimate
through the softmax misses large effects where the softmax is saturated. The correction
recomputes the attention pattern exactly with the patched queries or keys and stays linear
only after it: the estimated effect is ``sum_{s,u} (A'[s,u] - A[s,u]) * dL/dA[s,u]`` with the
gradient ``dL/dA[s,u] = g_s . v_u`` (``g_s`` the gradient at query ``s``'s attention output,
before the output projection; ``v_u`` key ``u``'s value). So it needs the gradient at the
output projection's input (``o_in``), never the attention weights themselves (the model keeps
its sdpa backend).

With ``e_u = exp(score_u - shift)``, ``N = sum e``, ``W = sum e * gA`` per query row and head,
patching the key columns ``K`` of a row gives

    effect = (W_rest + W'_K) / (N_rest + N'_K) - W / N

where ``rest`` sums over the columns outside ``K`` (old scores) and the primed sums over ``K``
(new scores): no ``1 - a`` divisions, so saturated rows stay exact. All of it in float64.

Shapes: queries ``[batch, heads, q, head_dim]``, keys and values ``[batch, kv_heads, k,
head_dim]`` (as the attention function receives them: after the rotary embedding, grouped
key heads not yet repeated), the gradient ``[batch, q, heads * head_dim]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from jaxtyping import Bool, Float
from torch import Tensor


@dataclass
class AttentionCall:
    """What one layer's attention function received (detached)."""

    query: Float[Tensor, "batch heads q dim"]
    key: Float[Tensor, "batch kv_heads k dim"]
    value: Float[Tensor, "batch kv_heads k dim"] | None
    mask: Tensor | None  #: ``[batch, 1|heads, q, k]`` boolean (True = attend) or additive; None: causal
    scaling: float
    softcap: float | None = None


def _repeat(t: Tensor, heads: int) -> Tensor:
    return t if t.shape[1] == heads else repeat(t, "b h k d -> b (h g) k d", g=heads // t.shape[1])


def scores(
    call: AttentionCall, rows: Tensor, key: Tensor | None = None, query: Tensor | None = None
) -> Float[Tensor, "batch heads r k"]:
    """Masked attention scores (float64, ``-inf`` where masked) of the query ``rows``, with the
    call's own queries and keys unless others are given."""
    q = (call.query if query is None else query)[:, :, rows]
    k = _repeat(call.key if key is None else key, q.shape[1])
    raw = torch.matmul(q.float(), k.float().transpose(-1, -2)).double() * call.scaling
    if call.softcap:
        raw = torch.tanh(raw / call.softcap) * call.softcap
    n_q, n_k = call.query.shape[2], k.shape[2]
    if call.mask is None:  # causal; the queries are the last of the keys
        q_cols = torch.arange(n_k - n_q, n_k, device=raw.device)[rows.to(raw.device)]
        allowed = torch.arange(n_k, device=raw.device)[None, :] <= q_cols[:, None]
        return raw.masked_fill(~allowed[None, None], float("-inf"))
    part = call.mask[:, :, rows.to(call.mask.device), :n_k].to(raw.device)
    if part.dtype == torch.bool:
        return raw.masked_fill(~part, float("-inf"))
    return raw + part.double()


def value_gradient(call: AttentionCall, grad_out: Tensor, rows: Tensor) -> Float[Tensor, "batch heads r k"]:
    """``dL/dA[b, h, s, u] = g[b, s, h] . v[b, h, u]`` for the query ``rows`` (float64)."""
    heads = call.query.shape[1]
    g = rearrange(grad_out[:, rows.to(grad_out.device)], "b r (h d) -> b h r d", h=heads)
    v = _repeat(call.value, heads).to(g.device)
    return torch.matmul(g.float(), v.float().transpose(-1, -2)).double()


def _finite_shift(x: Tensor) -> Tensor:
    m = x.amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _row_chunks(n: int, chunk: int) -> list[Tensor]:
    return [torch.arange(s, min(n, s + chunk)) for s in range(0, n, chunk)]


def key_group_effect(
    call: AttentionCall, source_key: Tensor, grad_out: Tensor, group: Bool[Tensor, "batch k"], chunk: int = 64
) -> Float[Tensor, " batch"]:
    """Estimated effect of replacing the keys at the ``group`` columns of each row with
    ``source_key``'s (all at once): the attention pattern recomputed exactly, then linear."""
    total = torch.zeros(call.query.shape[0], dtype=torch.float64)
    inside = group.to(call.query.device)[:, None, None, :]  # [B, 1, 1, K]
    for rows in _row_chunks(call.query.shape[2], chunk):
        old, new = scores(call, rows), scores(call, rows, key=source_key.to(call.key.device))
        new = torch.where(inside, new, torch.full_like(new, float("-inf")))
        shift = torch.maximum(_finite_shift(old), _finite_shift(new))
        e_old, e_new = torch.exp(old - shift), torch.exp(new - shift)
        g_a = value_gradient(call, grad_out, rows).to(e_old.device)
        n, w = e_old.sum(-1), (e_old * g_a).sum(-1)
        rest = e_old.masked_fill(inside, 0.0)
        n_new, w_new = rest.sum(-1) + e_new.sum(-1), (rest * g_a).sum(-1) + (e_new * g_a).sum(-1)
        effect = (w_new / n_new - w / n).nan_to_num(0.0, posinf=0.0, neginf=0.0)
        total += effect.sum((1, 2)).cpu()
    return total


def key_column_effects(
    call: AttentionCall, source_key: Tensor, grad_out: Tensor, chunk: int = 64
) -> Float[Tensor, "batch k"]:
    """Estimated effect of replacing each key column alone (every column at once, by the
    closed form): column ``t`` of row ``b`` holds the effect of patching key ``t`` only."""
    batch, n_k = call.query.shape[0], call.key.shape[2]
    total = torch.zeros(batch, n_k, dtype=torch.float64)
    for rows in _row_chunks(call.query.shape[2], chunk):
        old, new = scores(call, rows), scores(call, rows, key=source_key.to(call.key.device))
        shift = _finite_shift(old)
        e = torch.exp(old - shift)  # <= 1; the argmax column is 1
        g_a = value_gradient(call, grad_out, rows).to(e.device)
        n, w = e.sum(-1, keepdim=True), (e * g_a).sum(-1, keepdim=True)
        # the rest of the row without column t: N - e_t, except at the argmax (summed directly: no cancellation)
        top = old.argmax(-1, keepdim=True)
        at_top = torch.zeros_like(e, dtype=torch.bool).scatter_(-1, top, True)
        n_rest = torch.where(at_top, e.masked_fill(at_top, 0.0).sum(-1, keepdim=True), n - e)
        w_rest = torch.where(at_top, (e * g_a).masked_fill(at_top, 0.0).sum(-1, keepdim=True), w - e * g_a)
        # new column t: exp(new_t - shift), rescaled by exp(-d) with d = max(0, new_t - shift) against overflow
        d = (new - shift).clamp_min(0.0).nan_to_num(0.0)
        e_new = torch.exp(new - shift - d)
        scale = torch.exp(-d)
        effect = (scale * w_rest + e_new * g_a) / (scale * n_rest + e_new) - w / n
        effect = effect.nan_to_num(0.0, posinf=0.0, neginf=0.0)
        total += effect.sum((1, 2)).cpu()
    return total


def query_row_effects(
    call: AttentionCall, source_query: Tensor, grad_out: Tensor, chunk: int = 64
) -> Float[Tensor, "batch q"]:
    """Estimated effect of replacing each query row alone; rows are independent (each row's
    softmax sees only its own query), so a group's effect is the sum of its rows' exactly."""
    batch, n_q = call.query.shape[0], call.query.shape[2]
    total = torch.zeros(batch, n_q, dtype=torch.float64)
    for rows in _row_chunks(n_q, chunk):
        old = torch.softmax(scores(call, rows), -1).nan_to_num(0.0)
        new = torch.softmax(scores(call, rows, query=source_query.to(call.query.device)), -1).nan_to_num(0.0)
        g_a = value_gradient(call, grad_out, rows).to(old.device)
        total[:, rows] = ((new - old) * g_a).sum(-1).sum(1).cpu()
    return total
