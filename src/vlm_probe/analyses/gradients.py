"""Forwards for attribution: a source run (no gradients) and a run with gradients at chosen sites.

:func:`gradient_run` runs a batch once with every model parameter frozen (its flags restored
afterwards), adds a zero scalar that requires a gradient to each chosen site's activation
(``x + 0``: the same numbers, and no path upstream is cut, so one backward pass gives the
gradient at every chosen site), scores the logits with a metric and differentiates it. Only
activations get gradients, never parameters. With ``graddrop`` it also runs one backward pass
per decoder layer ``l`` with the gradient through layer ``l``'s residual contributions (its
attention and MLP outputs) set to zero on the way back (the GradDrop of Kramár et al. 2024);
the forward numbers are untouched.

Site accesses go one invoke per stage, in execution order, as in
:func:`~vlm_probe.interventions.sites.read_many`; each layer's attention-function inputs are
read in an invoke of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..interventions import sites as S
from ..model.inputs import Batch
from .attention_fix import AttentionCall
from .batched import keep_logits

if TYPE_CHECKING:
    from ..model.wrapper import VLM

Pair = tuple[str, int]
#: the sites through which a decoder layer writes into the residual stream (what GradDrop cuts)
RESIDUAL_WRITES = ("attn_out", "mlp_out")


@contextmanager
def frozen_parameters(*modules: torch.nn.Module) -> Iterator[None]:
    """Every parameter of ``modules`` without ``requires_grad`` inside the block; flags restored on exit."""
    params = list(dict.fromkeys(p for m in modules for p in m.parameters()))
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class _Switch:
    """Which layer's gradient the current backward pass drops (owned by one gradient run)."""

    def __init__(self) -> None:
        self.dropped: int | None = None


class _DropGrad(torch.autograd.Function):
    """Identity forward; backward passes the gradient on unless its layer is the dropped one."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, switch: _Switch, layer: int) -> Tensor:
        ctx.switch, ctx.layer = switch, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return (torch.zeros_like(grad) if ctx.switch.dropped == ctx.layer else grad), None, None


@dataclass
class GradientRun:
    """A batch's run with gradients: detached activations, gradients, logits, attention inputs."""

    activations: dict[Pair, Tensor]
    #: ``[0]``: the metric's gradient at every site; ``[1 + l]``: with decoder layer ``l`` dropped (GradDrop)
    gradients: list[dict[Pair, Tensor]]
    logits: Float[Tensor, "rows vocab"]  #: at the metric positions, float32, detached
    values: Float[Tensor, " rows"]  #: the metric on this run
    attention: dict[int, AttentionCall] = field(default_factory=dict)
    backwards: int = 1


def _by_stage(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    out: dict[str, list[Pair]] = {}
    for name, index in dict.fromkeys(pairs):
        out.setdefault(S.site(name).stage, []).append((name, index))
    return {stage: sorted(members, key=lambda p: (p[1], S.site(p[0]).sub)) for stage, members in out.items()}


def _read_attention(vlm: VLM, layer: int, need_value: bool) -> dict[str, Any]:
    """Inside an invoke: the inputs of decoder ``layer``'s attention function (detached)."""
    args, kwargs = vlm.attention_call(layer).inputs
    mask = args[4] if len(args) > 4 else kwargs.get("attention_mask")
    module = args[0]
    return {"query": args[1].detach(), "key": args[2].detach(),
            "value": args[3].detach() if need_value else None,
            "mask": None if mask is None else mask.detach(),
            "scaling": kwargs.get("scaling") or getattr(module, "scaling", None) or args[1].shape[-1] ** -0.5,
            "softcap": kwargs.get("softcap")}


def _attention_calls(saved: dict[int, dict[str, Any]]) -> dict[int, AttentionCall]:
    return {layer: AttentionCall(d["query"], d["key"], d["value"], d["mask"], float(d["scaling"]),
                                 None if d["softcap"] is None else float(d["softcap"])) for layer, d in saved.items()}


def source_run(
    vlm: VLM, batch: Batch, sites: Sequence[Pair], logits_index: tuple[Tensor, Tensor],
    attention_layers: Sequence[int] = (),
) -> tuple[dict[Pair, Tensor], Tensor, dict[int, AttentionCall]]:
    """One forward without gradients: the activations at ``sites``, the logits at
    ``logits_index`` (``(rows, positions)``), and the attention inputs of ``attention_layers``."""
    keep, column = keep_logits(logits_index[1])
    attention: dict[int, Any] = {}
    with torch.no_grad(), vlm.trace(logits_to_keep=keep, use_cache=False) as tracer:
        with tracer.invoke(batch):
            logits = vlm.lm_head.output[logits_index[0], column].save()
        acts = S.read_many(vlm, tracer, list(sites)) if sites else []
        for layer in attention_layers:
            with tracer.invoke():
                attention[layer] = nnsight.save(_read_attention(vlm, layer, need_value=False))
    return dict(zip(sites, acts)), logits.float(), _attention_calls(attention)


def gradient_run(
    vlm: VLM,
    batch: Batch,
    sites: Sequence[Pair],
    logits_index: tuple[Tensor, Tensor],
    metric: Callable[[Tensor], Tensor],
    *,
    attention_layers: Sequence[int] = (),
    graddrop: bool = False,
) -> GradientRun:
    """One forward with gradients at ``sites`` and one backward pass of ``metric`` (summed over
    rows: the rows of a batch never mix, so each row's gradient is its own); with ``graddrop``,
    one more backward pass per decoder layer.

    Args:
        sites: ``(site, index)`` pairs whose activations and gradients are returned.
        logits_index: ``(rows, positions)`` the metric reads.
        metric: maps ``[rows, vocab]`` float32 logits (with their graph) to ``[rows]`` values.
        attention_layers: decoder layers whose attention-function inputs are also returned.
    """
    sites = list(dict.fromkeys(sites))
    keep, column = keep_logits(logits_index[1])
    zero = torch.zeros((), requires_grad=True)
    switch = _Switch()
    gates = {(name, layer) for layer in range(vlm.n_layers) for name in RESIDUAL_WRITES} if graddrop else set()
    chosen = set(sites)
    attention: dict[int, Any] = {}
    with frozen_parameters(vlm.hf), torch.enable_grad():
        with vlm.trace(logits_to_keep=keep, use_cache=False) as tracer:
            with tracer.invoke(batch):
                logits = vlm.lm_head.output[logits_index[0], column].save()
            box = nnsight.save({})
            for members in _by_stage([*sites, *gates]).values():
                with tracer.invoke():
                    for name, index in members:
                        entry = S.site(name)
                        value = entry.read(vlm, index)
                        if (name, index) in chosen:
                            value = value + zero
                            box[(name, index)] = value
                        if (name, index) in gates:
                            value = _DropGrad.apply(value, switch, index)
                        entry.write(vlm, index, value)
            for layer in attention_layers:
                with tracer.invoke():
                    attention[layer] = nnsight.save(_read_attention(vlm, layer, need_value=True))
        values = metric(logits.float())
        if not values.requires_grad:
            raise InputError("Attribution needs a metric that is differentiable in the logits "
                             "(logit_diff, target_prob, kl_to_clean, restored; not first_token_change).")
        tapped = [box[p] for p in sites]
        passes = [None, *range(vlm.n_layers)] if graddrop else [None]
        gradients = []
        for i, dropped in enumerate(passes):
            switch.dropped = dropped
            grads = torch.autograd.grad(values.sum(), tapped, retain_graph=i < len(passes) - 1, allow_unused=True)
            gradients.append({p: (torch.zeros_like(t) if g is None else g).detach()
                              for p, t, g in zip(sites, tapped, grads)})
    return GradientRun({p: box[p].detach() for p in sites}, gradients, logits.detach().float(), values.detach(),
                       _attention_calls(attention), backwards=len(passes))
