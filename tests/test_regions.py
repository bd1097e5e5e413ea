"""Regions and cuts: one definition (vlm_probe.arch.regions) for weight tables, merges and freezing."""

from __future__ import annotations

import pytest

from vlm_probe.arch import Location, Region, get_spec
from vlm_probe.arch.regions import (
    REGION_NAMES,
    Cuts,
    check_region,
    in_region,
    locate_parameters,
    parameters_in,
    region_of,
    vision_depths,
    vision_depths_from_names,
)
from vlm_probe.errors import InputError, MergePlanError, RegionError


@pytest.mark.parametrize("cuts, n, expected", [
    (None, 28, (9, 18)), (None, 6, (2, 4)), (None, 3, (1, 2)), (None, 2, (1, 2)),
    ("8,20", 28, (8, 20)), ("8/20", 28, (8, 20)), ((1, 2), 3, (1, 2)), (Cuts(2, 4, 6), 6, (2, 4)),
])
def test_cuts_make(cuts, n, expected) -> None:
    assert Cuts.make(cuts, n).as_tuple() == expected


@pytest.mark.parametrize("cuts, n, message", [
    ("9,x", 28, "two integers"), ((9,), 28, "two decoder indices"), ((1, 2, 3), 28, "two decoder indices"),
    ((0, 5), 28, "non-empty parts"), ((5, 5), 28, "non-empty parts"), ((5, 28), 28, "non-empty parts"),
    ((2, 2), 3, "do not split"), ("9,40", 28, "non-empty parts"), ("0,5", 28, "after layer 0"),
    ("9;18", 28, "two integers"), ("9,18,20", 28, "two integers"),
])
def test_bad_cuts_raise_one_error_class(cuts, n, message) -> None:
    with pytest.raises(RegionError, match=message) as info:
        Cuts.make(cuts, n)
    assert isinstance(info.value, InputError) and isinstance(info.value, MergePlanError)


def test_parts_and_layers() -> None:
    cuts = Cuts.make(None, 28)
    assert [cuts.part(i) for i in (0, 8, 9, 17, 18, 27)] == ["early", "early", "mid", "mid", "late", "late"]
    assert list(cuts.layers("mid")) == list(range(9, 18)) and len(cuts.layers("late")) == 10
    with pytest.raises(RegionError, match="part must be"):
        cuts.layers("middle")


def _loc(region: Region, layer: int | None = None) -> Location:
    return Location("x", region, layer, "other")


@pytest.mark.parametrize("location, inside", [
    (_loc(Region.VISION, -2), {"vision", "all"}),
    (_loc(Region.VISION_OTHER), {"vision", "all"}),
    (_loc(Region.PROJECTOR, 0), {"projector", "all"}),
    (_loc(Region.EMBED), {"embed", "all"}),
    (_loc(Region.FINAL_NORM), {"final_norm", "head", "all"}),
    (_loc(Region.LM_HEAD), {"lm_head", "head", "all"}),
    (_loc(Region.OTHER), {"other", "all"}),
    (_loc(Region.LLM, 1), {"early", "llm", "all", "layers:0", "layers:0-3"}),
    (_loc(Region.LLM, 3), {"mid", "llm", "all", "layers:0-3", "layers:2-5"}),
    (_loc(Region.LLM, 6), {"late", "llm", "all", "layers:2-5", "layers:5"}),
])
def test_every_region_name(location, inside) -> None:
    cuts = Cuts.make(None, 6)  # early 0-1, mid 2-3, late 4-5 (decoder indices)
    for region in (*REGION_NAMES, "layers:0", "layers:0-3", "layers:2-5", "layers:5"):
        assert in_region(location, check_region(region, 6), cuts) == (region in inside), region


def test_coarse_regions() -> None:
    cuts = Cuts.make(None, 6)
    assert region_of(_loc(Region.LLM, 3), cuts) == "mid"
    assert region_of(_loc(Region.LM_HEAD), cuts) == "head"
    assert region_of(_loc(Region.LM_HEAD), cuts, split_head=True) == "lm_head"
    assert region_of(_loc(Region.VISION_OTHER), cuts) == "vision"


@pytest.mark.parametrize("region, message", [
    ("middle", "Unknown region"), ("layers:4-2", "empty"), ("layers:9", "reaches decoder layer 9"),
])
def test_bad_region_names(region, message) -> None:
    with pytest.raises(RegionError, match=message):
        check_region(region, 6)


def test_live_model_and_checkpoint_names_agree(zoo) -> None:
    tiny = zoo("qwen2_5_vl")
    spec = get_spec(tiny.model.config)
    names = [name for name, _ in tiny.model.named_parameters()]
    assert vision_depths(tiny.model, spec) == vision_depths_from_names(spec, names)
    assert sum(vision_depths(tiny.model, spec)) > 0
    located = locate_parameters(tiny.model, spec)
    mid = parameters_in(tiny.model, "mid", spec)
    assert mid and all(located[n].region is Region.LLM for n in mid)
    assert parameters_in(tiny.model, ["vision", "projector"], spec) == {
        n for n, loc in located.items() if loc.region in (Region.VISION, Region.VISION_OTHER, Region.PROJECTOR)}
    with pytest.raises(RegionError):
        parameters_in(tiny.model, "middle", spec)
