"""Regions of a model and the cuts between early, mid and late: the one definition.

Every region is a set of tensors placed on the unified layer index (:meth:`FamilySpec.locate`):

==============  ==================================================================
region          tensors
==============  ==================================================================
``vision``      vision tower (blocks, patch/position embeddings, final vision norm)
``projector``   the vision-to-language projector (unified index 0)
``embed``       token embeddings
``early``       LLM decoder layers ``[0, mid)`` (0-based decoder indices)
``mid``         decoder layers ``[mid, late)``
``late``        decoder layers ``[late, N)``
``llm``         every decoder layer
``layers:A-B``  decoder layers A..B, 0-based and inclusive (``layers:5`` for one)
``final_norm``  the LLM's final norm
``lm_head``     the unembedding
``head``        ``final_norm`` and ``lm_head``
``other``       anything the family spec does not place
``all``         everything
==============  ==================================================================

The cuts ``(mid, late)`` default to ``(N // 3, 2 * N // 3)``: 9 and 18 of 28 layers, the
published merge default. Weight tables group tensors into :data:`REGIONS`; merge and freezing
plans may name any region above. Bad names and bad cuts raise :class:`~vlm_probe.errors.RegionError`
(an ``InputError`` and a ``MergePlanError``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RegionError
from .spec import FamilySpec, Location, Region

#: The coarse regions of weight tables, in the order tables and plots list them.
REGIONS: tuple[str, ...] = ("vision", "projector", "embed", "early", "mid", "late", "head", "other")
#: The three parts of the decoder.
THIRDS: tuple[str, ...] = ("early", "mid", "late")
#: Every region a plan may name (besides ``layers:A-B``).
REGION_NAMES: tuple[str, ...] = ("vision", "projector", "embed", "early", "mid", "late", "llm", "final_norm",
                                 "lm_head", "head", "other", "all")
_LAYERS = re.compile(r"^layers:(\d+)(?:-(\d+))?$")


def parse_cuts(text: str) -> tuple[int, int]:
    """``"8,20"`` (or ``"8/20"``) -> ``(8, 20)``: where the mid and late parts start, 0-based and
    increasing, the first after layer 0 (the upper bound needs the model: :meth:`Cuts.make`).

    Raises:
        RegionError: not two whole numbers, or not ``0 < mid < late``.
    """
    parts = [part.strip() for part in text.replace("/", ",").split(",") if part.strip()]
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise RegionError(f"cuts must be two integers like 9,18 (0-based decoder layers), got {text!r}.")
    mid, late = int(parts[0]), int(parts[1])
    if not 0 < mid < late:
        raise RegionError(f"cuts {text!r}: the mid part must start after layer 0 and before the late one, e.g. 9,18.")
    return mid, late


@dataclass(frozen=True)
class Cuts:
    """Where the LLM's mid and late parts start (0-based decoder indices) in an ``n_layers`` decoder."""

    mid: int
    late: int
    n_layers: int

    @classmethod
    def make(cls, cuts: Sequence[int] | str | Cuts | None, n_layers: int) -> Cuts:
        """Validate ``cuts`` (two increasing decoder indices, ``"8,20"``, or None for the default thirds).

        Raises:
            RegionError: the cuts are not two integers, or do not split the decoder into three
                non-empty parts (``0 < mid < late < n_layers``).
        """
        if isinstance(cuts, Cuts):
            cuts = (cuts.mid, cuts.late)
        if cuts is None:
            if n_layers < 3:  # too shallow for thirds: as many one-layer parts as there are layers
                return cls(min(1, n_layers), min(2, n_layers), n_layers)
            return cls(n_layers // 3, 2 * n_layers // 3, n_layers)
        if isinstance(cuts, str):
            cuts = parse_cuts(cuts)
        values = list(cuts)
        if len(values) != 2:
            raise RegionError(f"cuts must be two decoder indices (where mid and late start), got {values}.")
        mid, late = (int(v) for v in values)
        if not 0 < mid < late < n_layers:
            raise RegionError(
                f"cuts {mid},{late} do not split {n_layers} decoder layers into three non-empty parts; need "
                f"0 < mid < late < {n_layers} (0-based decoder indices, e.g. {max(1, n_layers // 3)},"
                f"{max(2, 2 * n_layers // 3)})."
            )
        return cls(mid, late, n_layers)

    def part(self, decoder_index: int) -> str:
        """``early``, ``mid`` or ``late`` for a 0-based decoder index."""
        if decoder_index < self.mid:
            return "early"
        if decoder_index < self.late:
            return "mid"
        return "late"

    def layers(self, part: str) -> range:
        """The 0-based decoder indices of ``early``, ``mid`` or ``late``."""
        bounds = {"early": (0, self.mid), "mid": (self.mid, self.late), "late": (self.late, self.n_layers)}
        if part not in bounds:
            raise RegionError(f"part must be one of {', '.join(THIRDS)}; got {part!r}.")
        return range(*bounds[part])

    def as_tuple(self) -> tuple[int, int]:
        return (self.mid, self.late)

    def as_dict(self) -> dict[str, int]:
        return {"mid": self.mid, "late": self.late, "n_layers": self.n_layers}


def check_region(region: str, n_layers: int | None = None) -> str:
    """Validate one region name (raises :class:`~vlm_probe.errors.RegionError` naming the valid ones)."""
    match = _LAYERS.match(region) if isinstance(region, str) else None
    if match:
        start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
        if stop < start:
            raise RegionError(f"Region {region!r}: the range is empty (write layers:A-B with A <= B).")
        if n_layers is not None and stop >= n_layers:
            raise RegionError(f"Region {region!r} reaches decoder layer {stop}, but the model has {n_layers} "
                              f"(0..{n_layers - 1}).")
        return region
    if region not in REGION_NAMES:
        raise RegionError(f"Unknown region {region!r}; use one of {', '.join(REGION_NAMES)} or layers:A-B.")
    return region


def in_region(location: Location, region: str, cuts: Cuts) -> bool:
    """Whether a located tensor belongs to ``region`` (any name :func:`check_region` accepts)."""
    r = location.region
    simple = {
        "all": True,
        "vision": r in (Region.VISION, Region.VISION_OTHER),
        "projector": r is Region.PROJECTOR,
        "embed": r is Region.EMBED,
        "final_norm": r is Region.FINAL_NORM,
        "lm_head": r is Region.LM_HEAD,
        "head": r in (Region.FINAL_NORM, Region.LM_HEAD),
        "other": r is Region.OTHER,
    }
    if region in simple:
        return simple[region]
    if r is not Region.LLM or location.layer is None:
        return False
    decoder = location.layer - 1
    if region == "llm":
        return True
    if region in THIRDS:
        return cuts.part(decoder) == region
    match = _LAYERS.match(region)
    if match is None:
        check_region(region)  # raises, naming the valid regions
    assert match is not None
    start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
    return start <= decoder <= stop


def region_of(location: Location, cuts: Cuts, *, split_head: bool = False) -> str:
    """The coarse region of a located tensor: one of :data:`REGIONS` (``final_norm`` and
    ``lm_head`` instead of ``head`` with ``split_head=True``)."""
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
        return region.value if split_head else "head"
    return "other"


def vision_depths(model: Any, spec: FamilySpec) -> tuple[int, ...]:
    """Blocks in each of the spec's vision block lists of a live HF model (0 where a list is absent)."""
    depths = []
    for path in spec.vision_blocks:
        try:
            depths.append(len(model.get_submodule(path)))
        except AttributeError:
            depths.append(0)
    return tuple(depths)


def vision_depths_from_names(spec: FamilySpec, names: Iterable[str]) -> tuple[int, ...]:
    """Blocks in each of the spec's vision block lists, from the block indices in module-path names."""
    patterns = [re.compile(rf"^{re.escape(prefix)}\.(\d+)\.") for prefix in spec.vision_blocks]
    depths = [0] * len(patterns)
    for name in names:
        for i, pattern in enumerate(patterns):
            match = pattern.match(name)
            if match:
                depths[i] = max(depths[i], int(match.group(1)) + 1)
                break
    return tuple(depths)


def n_decoder_layers(model: Any, spec: FamilySpec) -> int:
    """Decoder layers of a live HF model."""
    return len(model.get_submodule(spec.decoder_layers))


def locate_parameters(model: Any, spec: FamilySpec) -> dict[str, Location]:
    """Every parameter of a live HF model (module-path names) on the unified layer index."""
    depths = vision_depths(model, spec)
    return {name: spec.locate(name, depths) for name, _ in model.named_parameters()}


def parameters_in(model: Any, regions: str | Iterable[str], spec: FamilySpec,
                  cuts: Sequence[int] | str | Cuts | None = None) -> frozenset[str]:
    """Names of the parameters of a live HF model in any of ``regions``."""
    wanted = [regions] if isinstance(regions, str) else list(regions)
    n_layers = n_decoder_layers(model, spec)
    for region in wanted:
        check_region(region, n_layers)
    cut = Cuts.make(cuts, n_layers)
    return frozenset(name for name, loc in locate_parameters(model, spec).items()
                     if any(in_region(loc, region, cut) for region in wanted))
