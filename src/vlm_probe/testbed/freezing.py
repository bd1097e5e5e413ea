"""Which parameters a training stage may change: regions of the model, named the same for every family.

A freezing spec is a region name, a collection of region names, a
:class:`vlm_probe.weights.plans.FreezePlan` (the surgery module's plans, including its own
region syntax such as ``layers:A-B``), or any callable that takes a parameter's module-path
name (``model.language_model.layers.3.mlp.up_proj.weight``) and returns True to freeze it.
Regions:

======================  ==================================================================
``vision``              vision tower (blocks, patch and position embeddings, its norms)
``projector``           the vision-language projector / merger (unified layer 0)
``embed``               token embeddings
``early``/``mid``/``late``  LLM decoder layers ``[0, c1)``, ``[c1, c2)``, ``[c2, N)`` (0-based)
``final_norm``          the LLM's final norm
``lm_head``             the output head
``other``               anything the family spec does not place
======================  ==================================================================

The cuts ``(c1, c2)`` default to ``(N // 3, 2 * N // 3)`` (9 and 18 for 28 layers, as in the
published layer merges). Regions come from :meth:`vlm_probe.arch.FamilySpec.locate`, the
same unified layer index the weight analyses use.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch

from ..arch import FamilySpec, Region, get_spec
from ..errors import MergePlanError

REGIONS: tuple[str, ...] = ("vision", "projector", "embed", "early", "mid", "late", "final_norm", "lm_head", "other")
THIRDS: tuple[str, ...] = ("early", "mid", "late")

FreezeSpec = Union[str, Collection[str], Callable[[str], bool], Any, None]


def thirds_cuts(n_layers: int, cuts: tuple[int, int] | None = None) -> tuple[int, int]:
    """The decoder-layer cuts ``(c1, c2)`` between early, mid and late (0-based, exclusive ends)."""
    c1, c2 = cuts if cuts is not None else (n_layers // 3, 2 * n_layers // 3)
    if not 0 < c1 < c2 < n_layers:
        raise MergePlanError(
            f"Layer cuts {(c1, c2)} do not split {n_layers} decoder layers into three non-empty blocks; "
            f"need 0 < c1 < c2 < {n_layers}, e.g. {(max(1, n_layers // 3), max(2, 2 * n_layers // 3))}."
        )
    return int(c1), int(c2)


def _vision_depths(model: torch.nn.Module, spec: FamilySpec) -> tuple[int, ...]:
    depths = []
    for path in spec.vision_blocks:
        try:
            depths.append(len(model.get_submodule(path)))  # type: ignore[arg-type]
        except AttributeError:
            depths.append(0)
    return tuple(depths)


def parameter_regions(
    model: torch.nn.Module, spec: FamilySpec | None = None, cuts: tuple[int, int] | None = None
) -> dict[str, str]:
    """Region of every named parameter of an HF model (module-path names)."""
    spec = spec or get_spec(model.config)
    depths = _vision_depths(model, spec)
    n_layers = len(model.get_submodule(spec.decoder_layers))  # type: ignore[arg-type]
    c1, c2 = thirds_cuts(n_layers, cuts)
    out = {}
    for name, _ in model.named_parameters():
        location = spec.locate(name, depths)
        region = location.region
        if region in (Region.VISION, Region.VISION_OTHER):
            out[name] = "vision"
        elif region == Region.LLM:
            index = int(location.layer) - 1  # unified index -> 0-based decoder index
            out[name] = "early" if index < c1 else "mid" if index < c2 else "late"
        else:
            out[name] = region.value if region.value in REGIONS else "other"
    return out


def frozen_names(
    model: torch.nn.Module,
    freeze: FreezeSpec,
    spec: FamilySpec | None = None,
    cuts: tuple[int, int] | None = None,
) -> frozenset[str]:
    """Names of the parameters a freezing spec freezes.

    Args:
        model: the HF model.
        freeze: a region, a collection of regions (see :data:`REGIONS`), a callable on
            parameter names, or None (nothing frozen).
        cuts: decoder-layer cuts between early, mid and late (default: thirds).
    """
    names = [name for name, _ in model.named_parameters()]
    if freeze is None:
        return frozenset()
    if hasattr(freeze, "is_frozen") and hasattr(freeze, "frozen"):  # a vlm_probe.weights FreezePlan
        from ..weights.freezing import frozen_parameter_names

        return frozenset(frozen_parameter_names(model, freeze, spec or get_spec(model.config)))  # type: ignore[arg-type]
    if callable(freeze):
        return frozenset(name for name in names if freeze(name))
    wanted = {freeze} if isinstance(freeze, str) else set(freeze)
    unknown = wanted - set(REGIONS)
    if unknown:
        raise MergePlanError(
            f"Unknown region(s) {sorted(unknown)} in the freezing spec; use any of {', '.join(REGIONS)}, "
            "or pass a function of the parameter name."
        )
    regions = parameter_regions(model, spec, cuts)
    return frozenset(name for name in names if regions[name] in wanted)


@contextmanager
def frozen(model: torch.nn.Module, names: Collection[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Set ``requires_grad=False`` on ``names`` for the block; yields the trainable parameters.

    Every parameter's ``requires_grad`` is restored on exit, exceptions included.
    """
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    missing = set(names) - set(before)
    if missing:
        raise MergePlanError(f"The freezing plan names parameters the model lacks: {sorted(missing)[:5]}.")
    try:
        for name, p in model.named_parameters():
            if name in names:
                p.requires_grad_(False)
        yield [p for _, p in model.named_parameters() if p.requires_grad]
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(before[name])


def describe_freeze(freeze: FreezeSpec) -> Any:
    """A JSON-able description of a freezing spec (callables by their qualified name)."""
    if freeze is None:
        return []
    if hasattr(freeze, "is_frozen") and hasattr(freeze, "frozen"):
        return sorted(freeze.frozen)  # type: ignore[union-attr]
    if callable(freeze):
        return f"callable:{getattr(freeze, '__module__', '?')}.{getattr(freeze, '__qualname__', repr(freeze))}"
    return [freeze] if isinstance(freeze, str) else sorted(freeze)
