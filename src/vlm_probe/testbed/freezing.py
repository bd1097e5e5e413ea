"""Which parameters a training stage may change: regions of the model, named the same for every family.

A freezing spec is a region name or a collection of them (any name of
:data:`vlm_probe.arch.regions.REGION_NAMES`, or ``layers:A-B``), a
:class:`vlm_probe.weights.plans.FreezePlan`, or any callable that takes a parameter's module-path
name (``model.language_model.layers.3.mlp.up_proj.weight``) and returns True to freeze it.
Regions and the early / mid / late cuts (default ``N // 3`` and ``2 * N // 3``) are defined once,
in :mod:`vlm_probe.arch.regions`, on the same unified layer index the weight analyses use.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, Union

import torch

from ..arch import FamilySpec, get_spec
from ..arch.regions import parameters_in
from ..errors import MergePlanError

FreezeSpec = Union[str, Collection[str], Callable[[str], bool], Any, None]


def frozen_names(
    model: torch.nn.Module,
    freeze: FreezeSpec,
    spec: FamilySpec | None = None,
    cuts: tuple[int, int] | None = None,
) -> frozenset[str]:
    """Names of the parameters a freezing spec freezes.

    Args:
        model: the HF model.
        freeze: a region, a collection of regions (raises ``RegionError`` naming the valid ones), a callable on
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
    return parameters_in(model, freeze, spec or get_spec(model.config), cuts)


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
