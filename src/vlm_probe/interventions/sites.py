"""Activation sites by name, read and written inside a trace.

=============  ==============================================  ===========================
site           what                                            shape
=============  ==============================================  ===========================
``layer_in``   residual stream entering decoder layer ``i``    ``[batch, seq, d_model]``
``layer_out``  residual stream leaving decoder layer ``i``     ``[batch, seq, d_model]``
``attn_out``   the attention block's output (before the add)   ``[batch, seq, d_model]``
``mlp_out``    the MLP block's output (before the add)         ``[batch, seq, d_model]``
``q``/``k``/``v``  attention projections (keys/values pre-RoPE) ``[batch, seq, heads*head_dim]``
``o_in``       the input of the output projection (per-head)   ``[batch, seq, heads*head_dim]``
=============  ==============================================  ===========================

Writes are out of place (the edited activation is a new tensor), so values saved earlier in
the same trace are never changed behind the user's back.
"""

from __future__ import annotations

from typing import Any

from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError

SITES: tuple[str, ...] = ("layer_in", "layer_out", "attn_out", "mlp_out", "q", "k", "v", "o_in")


def check_site(site: str) -> str:
    if site not in SITES:
        raise InputError(f"Unknown site {site!r}; use one of {', '.join(SITES)}.")
    return site


def read(vlm: Any, site: str, layer: int) -> Tensor:
    """The activation at ``site`` of decoder layer ``layer`` (0-based), inside a trace."""
    sites = vlm.layers[layer]
    if site == "layer_in":
        return sites.input
    if site == "layer_out":
        return sites.output
    if site == "attn_out":
        return sites.attn.output[0]
    if site == "mlp_out":
        return sites.mlp.output
    if site in ("q", "k", "v"):
        return getattr(sites, site).output
    if site == "o_in":
        return sites.o.input
    raise InputError(f"Unknown site {site!r}; use one of {', '.join(SITES)}.")


def write(vlm: Any, site: str, layer: int, value: Tensor) -> None:
    """Replace the whole activation at ``site`` of ``layer`` with ``value``, inside a trace."""
    sites = vlm.layers[layer]
    if site == "layer_in":
        sites.input = value
    elif site == "layer_out":
        sites.output = value
    elif site == "attn_out":
        sites.attn.output = (value, *sites.attn.output[1:])
    elif site == "mlp_out":
        sites.mlp.output = value
    elif site in ("q", "k", "v"):
        getattr(sites, site).output = value
    elif site == "o_in":
        sites.o.input = value
    else:
        raise InputError(f"Unknown site {site!r}; use one of {', '.join(SITES)}.")


def edit(vlm: Any, site: str, layer: int, mask: Bool[Tensor, "batch seq"], values: Tensor) -> Tensor:
    """Set the activation at the ``True`` positions of ``mask`` to ``values``, inside a trace.

    Args:
        mask: ``[batch, seq]`` positions to change.
        values: ``[n_true, dim]`` (one row per selected position, in row-major order), a full
            ``[batch, seq, dim]`` activation to take the selected positions from, ``[dim]``, or a
            scalar.

    Returns:
        The new activation.
    """
    current = read(vlm, site, layer)
    mask = mask.to(current.device)
    new = current.clone()
    if values.dim() == current.dim() and values.shape[:2] == current.shape[:2]:
        new[mask] = values.to(current.device, current.dtype)[mask]
    else:
        new[mask] = values.to(current.device, current.dtype)
    write(vlm, site, layer, new)
    return new
