"""Interventions: small frozen objects with one ``apply``, the site registry, and primitives.

    from vlm_probe.interventions import Patch, Ablate, Skip, Knockout, SwapKV, Add

    with vlm.trace(batch):
        Patch("layer_out", 12, "vision").apply(vlm, batch, source=value)   # another run/checkpoint
        Ablate("mlp_out", 5, "question", mode="mean").apply(vlm, batch, reference=mean)
        Skip(20).apply(vlm, batch)
        Knockout(18, queries="last", keys="vision").apply(vlm, batch)

The function primitives (``patch``, ``ablate``, ``skip_layer``, ``knockout``,
``swap_vision_kv``) are one-line front ends of the same objects. Sites live in one registry
(:mod:`~vlm_probe.interventions.sites`); interventions in :mod:`~vlm_probe.interventions.objects`.
"""

from .attention import check_swap_pair, knockout, knockout_mask, swap_vision_kv, vision_kv
from .objects import (KINDS, Ablate, Add, Intervention, Knockout, Patch, Skip, SwapKV, variant_from_json,
                      variant_json)
from .positions import PositionSpec, column_mask, positions_label, resolve_positions
from .primitives import ablate, activations_at, mean_activation, patch, skip_layer
from .sites import REGISTRY, SITES, Scope, Site, read, write

__all__ = [
    "KINDS",
    "REGISTRY",
    "SITES",
    "Ablate",
    "Add",
    "Intervention",
    "Knockout",
    "Patch",
    "PositionSpec",
    "Scope",
    "Site",
    "Skip",
    "SwapKV",
    "ablate",
    "activations_at",
    "check_swap_pair",
    "column_mask",
    "knockout",
    "knockout_mask",
    "mean_activation",
    "patch",
    "positions_label",
    "read",
    "resolve_positions",
    "skip_layer",
    "swap_vision_kv",
    "variant_from_json",
    "variant_json",
    "vision_kv",
    "write",
]
