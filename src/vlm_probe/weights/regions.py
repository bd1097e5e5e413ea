"""Regions of a model for weight tables (the definitions live in :mod:`vlm_probe.arch.regions`).

The LLM is cut into three parts at two decoder indices (0-based): ``cuts=(8, 20)`` on a
28-layer model gives early = decoder layers 0-7 (unified 1-8), mid = 8-19, late = 20-27.
The default cuts are ``(N // 3, 2 * N // 3)`` (9/18 of 28, the published merge default).
"""

from __future__ import annotations

from ..arch import Location, unified_index_label
from ..arch.regions import REGIONS, Cuts, region_of

__all__ = ["REGIONS", "Cuts", "layer_label", "region_of"]


def layer_label(location: Location) -> str:
    """Row label: ``V-2``, ``P``, ``L7`` on the unified index; the part name for the other rows."""
    if location.layer is not None:
        return unified_index_label(location.layer)
    return location.region.value
