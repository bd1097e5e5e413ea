"""Intervention primitives, called inside a trace (``with vlm.trace(batch): patch(...)``).

Each primitive is a one-line front end of an intervention object
(:mod:`~vlm_probe.interventions.objects`): ``patch(...)`` is ``Patch(...).apply(...)``, the
same code every sweep runs. Each changes the running forward only; nothing outlives the trace.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch
from . import sites as site_ops
from .objects import Ablate, Patch, Skip
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
        layer: 0-based decoder layer or vision block (negative counts from the end).
        positions: group name, positions or ``[batch, seq]`` mask.
        value: ``[batch, seq, dim]`` (an activation of another run, another invoke, or another
            checkpoint, same width), ``[n_selected, dim]``, or ``[dim]``.

    Returns:
        The patched activation.
    """
    return Patch(site, layer, positions).apply(vlm, batch, source=value)


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
    if mode != "zero" and reference is None:
        raise InputError(f"{mode}-ablation needs reference activations (see vlm_probe.interventions.mean_activation).")
    return Ablate(site, layer, positions, mode=mode, seed=seed).apply(vlm, batch, reference=reference)


def skip_layer(vlm: Any, layer: int) -> None:
    """Make decoder layer ``layer`` the identity: its output is its input.

    The layer still runs (so a KV cache stays consistent across generation steps); its
    attention and MLP contributions are removed from the residual stream. In a generation
    trace, apply it at every step (``for _ in tracer.iter[:n]: skip_layer(vlm, L)``).
    """
    Skip(layer).apply(vlm, None)


def mean_activation(
    vlm: Any, batch: Batch, site: str, layer: int, positions: PositionSpec = "all"
) -> Float[Tensor, " dim"]:
    """Mean activation of ``site`` at ``layer`` over the selected positions of a reference batch."""
    mask = resolve_positions(batch, positions, vlm=vlm)
    layer = site_ops.index_of(vlm, site, layer)
    with torch.no_grad(), vlm.trace(batch):
        act = site_ops.read(vlm, site, layer).save()
    return act[mask.to(act.device)].float().mean(0).to(act.dtype)


def activations_at(
    vlm: Any, batch: Batch, site: str, layer: int, positions: PositionSpec = "all"
) -> Float[Tensor, "n dim"]:
    """Activations of ``site`` at ``layer`` at the selected positions (rows in row-major order)."""
    mask = resolve_positions(batch, positions, vlm=vlm)
    layer = site_ops.index_of(vlm, site, layer)
    with torch.no_grad(), vlm.trace(batch):
        act = site_ops.read(vlm, site, layer).save()
    return act[mask.to(act.device)]
