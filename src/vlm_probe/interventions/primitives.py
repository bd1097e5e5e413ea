"""Intervention primitives, called inside a trace (``with vlm.trace(batch): patch(...)``).

Each primitive changes the running forward only; nothing outlives the trace.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch
from . import sites as site_ops
from .positions import PositionSpec, resolve_positions

AblationMode = Literal["zero", "mean", "resample"]


def patch(
    vlm: Any,
    batch: Batch,
    site: str,
    layer: int,
    positions: PositionSpec,
    value: Tensor,
) -> Tensor:
    """Replace the activation at ``site`` of ``layer`` at ``positions`` with ``value``.

    Args:
        batch: the batch this trace (or invoke) runs; names the positions.
        site: one of :data:`~vlm_probe.interventions.sites.SITES`.
        layer: 0-based decoder layer.
        positions: group name, positions or ``[batch, seq]`` mask.
        value: ``[batch, seq, dim]`` (an activation of another run, another invoke, or another
            checkpoint, same width), ``[n_selected, dim]``, or ``[dim]``.

    Returns:
        The patched activation.
    """
    site_ops.check_site(site)
    mask = resolve_positions(batch, positions, vlm=vlm, what=f"patching {site} at {positions!r}")
    return site_ops.edit(vlm, site, layer, mask, value)


def ablate(
    vlm: Any,
    batch: Batch,
    site: str,
    layer: int,
    positions: PositionSpec,
    mode: AblationMode = "zero",
    reference: Tensor | None = None,
    seed: int = 0,
) -> Tensor:
    """Zero-, mean- or resample-ablate ``site`` of ``layer`` at ``positions``.

    Args:
        mode: ``"zero"``; ``"mean"`` (``reference`` is a ``[dim]`` mean, e.g. from
            :func:`mean_activation`); ``"resample"`` (``reference`` is ``[n_ref, dim]``: each
            selected position takes a row drawn with ``seed``).
    """
    site_ops.check_site(site)
    mask = resolve_positions(batch, positions, vlm=vlm, what=f"ablating {site} at {positions!r}")
    n = int(mask.sum())
    if mode == "zero":
        return site_ops.edit(vlm, site, layer, mask, torch.zeros(()))
    if reference is None:
        raise InputError(f"{mode}-ablation needs reference activations (see vlm_probe.interventions.mean_activation).")
    if mode == "mean":
        if reference.dim() != 1:
            raise InputError(f"mean-ablation takes a [dim] mean; got shape {tuple(reference.shape)}.")
        return site_ops.edit(vlm, site, layer, mask, reference.expand(n, -1))
    if mode == "resample":
        if reference.dim() != 2:
            raise InputError(f"resample-ablation takes [n_ref, dim] rows; got shape {tuple(reference.shape)}.")
        generator = torch.Generator().manual_seed(seed)
        rows = torch.randint(0, reference.shape[0], (n,), generator=generator)
        return site_ops.edit(vlm, site, layer, mask, reference[rows])
    raise InputError(f"Unknown ablation mode {mode!r}; use 'zero', 'mean' or 'resample'.")


def skip_layer(vlm: Any, layer: int) -> None:
    """Make decoder layer ``layer`` the identity: its output is its input.

    The layer still runs (so a KV cache stays consistent across generation steps); its
    attention and MLP contributions are removed from the residual stream. In a generation
    trace, apply it at every step (``for _ in tracer.iter[:n]: skip_layer(vlm, L)``).
    """
    sites = vlm.layers[layer]
    sites.output = sites.input


def mean_activation(
    vlm: Any, batch: Batch, site: str, layer: int, positions: PositionSpec = "all"
) -> Float[Tensor, " dim"]:
    """Mean activation of ``site`` at ``layer`` over the selected positions of a reference batch."""
    mask = resolve_positions(batch, positions, vlm=vlm)
    with torch.no_grad(), vlm.trace(batch):
        act = site_ops.read(vlm, site, layer).save()
    return act[mask.to(act.device)].float().mean(0).to(act.dtype)


def activations_at(
    vlm: Any, batch: Batch, site: str, layer: int, positions: PositionSpec = "all"
) -> Float[Tensor, "n dim"]:
    """Activations of ``site`` at ``layer`` at the selected positions (rows in row-major order)."""
    mask = resolve_positions(batch, positions, vlm=vlm)
    with torch.no_grad(), vlm.trace(batch):
        act = site_ops.read(vlm, site, layer).save()
    return act[mask.to(act.device)]
