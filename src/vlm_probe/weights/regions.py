"""Coarse regions of a model for weight tables: vision, projector, embed, early/mid/late LLM, head.

The LLM is cut into three parts at two decoder indices (0-based): ``cuts=(8, 20)`` on a
28-layer model gives early = decoder layers 0-7 (unified 1-8), mid = 8-19, late = 20-27.
The default cuts are ``(N // 3, 2 * N // 3)`` (9/18 of 28, the published merge default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..arch import Location, Region, unified_index_label
from ..errors import InputError

#: Region names in the order tables and plots list them.
REGIONS: tuple[str, ...] = ("vision", "projector", "embed", "early", "mid", "late", "head", "other")


@dataclass(frozen=True)
class Cuts:
    """Where the LLM's mid and late thirds start (0-based decoder indices)."""

    mid: int
    late: int
    n_layers: int

    @classmethod
    def make(cls, cuts: Sequence[int] | str | None, n_layers: int) -> Cuts:
        """Validate ``cuts`` (two increasing decoder indices, or ``"8,20"``) for ``n_layers`` layers."""
        if cuts is None:
            if n_layers < 3:
                return cls(min(1, n_layers), min(2, n_layers), n_layers)
            return cls(n_layers // 3, 2 * n_layers // 3, n_layers)
        if isinstance(cuts, str):
            try:
                cuts = [int(part) for part in cuts.replace("/", ",").split(",") if part.strip()]
            except ValueError as error:
                raise InputError(f"cuts must be two integers like '8,20', got {cuts!r}.") from error
        values = list(cuts)
        if len(values) != 2:
            raise InputError(f"cuts must be two decoder indices (where mid and late start), got {values}.")
        mid, late = (int(v) for v in values)
        if not 0 < mid < late < n_layers:
            raise InputError(
                f"cuts {mid},{late} do not split {n_layers} decoder layers into three non-empty parts; need "
                f"0 < mid < late < {n_layers} (0-based decoder indices, e.g. 8,20 of 28)."
            )
        return cls(mid, late, n_layers)

    def part(self, decoder_index: int) -> str:
        """``early``, ``mid`` or ``late`` for a 0-based decoder index."""
        if decoder_index < self.mid:
            return "early"
        if decoder_index < self.late:
            return "mid"
        return "late"

    def as_dict(self) -> dict[str, int]:
        return {"mid": self.mid, "late": self.late, "n_layers": self.n_layers}


def region_of(location: Location, cuts: Cuts) -> str:
    """The coarse region of a located tensor (one of :data:`REGIONS`)."""
    region = location.region
    if region is Region.LLM:
        assert location.layer is not None
        return cuts.part(location.layer - 1)
    if region in (Region.VISION, Region.VISION_OTHER):
        return "vision"
    if region is Region.PROJECTOR:
        return "projector"
    if region is Region.EMBED:
        return "embed"
    if region in (Region.FINAL_NORM, Region.LM_HEAD):
        return "head"
    return "other"


def layer_label(location: Location) -> str:
    """Row label: ``V-2``, ``P``, ``L7`` on the unified index; the part name for the other rows."""
    if location.layer is not None:
        return unified_index_label(location.layer)
    return location.region.value
