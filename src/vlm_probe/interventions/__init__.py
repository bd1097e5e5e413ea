"""Intervention primitives, usable inside any trace (and in your own intervention scripts).

    with vlm.trace(batch):
        patch(vlm, batch, "layer_out", 12, "vision", value)     # from another run/invoke/checkpoint
        ablate(vlm, batch, "mlp_out", 5, "question", mode="mean", reference=mean)
        skip_layer(vlm, 20)
        knockout(vlm, 18, queries=batch.layout.mask("last"), keys=batch.layout.mask("vision"))
"""

from .attention import check_swap_pair, knockout, knockout_mask, swap_vision_kv, vision_kv
from .positions import PositionSpec, positions_label, resolve_positions
from .primitives import ablate, activations_at, mean_activation, patch, skip_layer
from .sites import SITES, read, write

__all__ = [
    "SITES",
    "PositionSpec",
    "ablate",
    "activations_at",
    "check_swap_pair",
    "knockout",
    "knockout_mask",
    "mean_activation",
    "patch",
    "positions_label",
    "read",
    "resolve_positions",
    "skip_layer",
    "swap_vision_kv",
    "vision_kv",
    "write",
]
