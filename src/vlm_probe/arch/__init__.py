"""Model-family specs: one small declarative file per family, and the registry that finds them;
the unified layer index (:mod:`.spec`) and the regions and cuts over it (:mod:`.regions`).

Adding a family::

    from vlm_probe.arch import FamilySpec, register_family
    register_family(FamilySpec(name="my_vlm", display_name="MyVLM", model_types=("my_vlm",), ...))

or pass ``spec=`` to :func:`vlm_probe.load` to use a spec without registering it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from ..errors import UnknownFamilyError
from .regions import (
    REGION_NAMES,
    REGIONS,
    THIRDS,
    Cuts,
    check_region,
    in_region,
    locate_parameters,
    parameters_in,
    region_of,
    vision_depths,
    vision_depths_from_names,
)
from .spec import (
    COMPONENT_RULES,
    LLAVA_STYLE_KEYS,
    QWEN_STYLE_KEYS,
    FamilySpec,
    Location,
    Region,
    component_of,
    unified_index_label,
)

BUILTIN_FAMILIES: tuple[str, ...] = (
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
    "paligemma",
    "gemma3",
    "internvl",
    "mllama",
)


class FamilyRegistry:
    """Specs by family name, looked up by a config's ``model_type``."""

    def __init__(self, specs: list[FamilySpec] | None = None) -> None:
        self._specs: dict[str, FamilySpec] = {}
        for spec in specs or []:
            self.register(spec)

    def register(self, spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
        """Add ``spec``; refuses to shadow an existing family unless ``replace=True``."""
        if not isinstance(spec, FamilySpec):
            raise TypeError(f"register() takes a FamilySpec, got {type(spec).__name__}.")
        if spec.name in self._specs and not replace:
            raise ValueError(f"Family {spec.name!r} is already registered; pass replace=True to override it.")
        self._specs[spec.name] = spec
        return spec

    def __iter__(self) -> Iterator[FamilySpec]:
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def get(self, key: str | Any) -> FamilySpec:
        """The spec for a family name, a ``model_type``, or a config object."""
        model_type = key if isinstance(key, str) else getattr(key, "model_type", None)
        if model_type in self._specs:
            return self._specs[model_type]
        for spec in self._specs.values():
            if model_type in spec.model_types:
                return spec
        raise UnknownFamilyError(
            f"No vlm_probe family spec for model_type {model_type!r}. Supported: {', '.join(self.names())}. "
            "To add one, describe its module paths in a FamilySpec and call "
            "vlm_probe.arch.register_family(spec), or pass spec=... to vlm_probe.load() "
            "(see docs/howto/new-family.md)."
        )


def _builtin_registry() -> FamilyRegistry:
    specs = [importlib.import_module(f"{__name__}.families.{name}").SPEC for name in BUILTIN_FAMILIES]
    return FamilyRegistry(specs)


#: The registry that :func:`vlm_probe.load` consults.
REGISTRY = _builtin_registry()


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Register ``spec`` so that :func:`vlm_probe.load` recognises its ``model_types``."""
    return REGISTRY.register(spec, replace=replace)


def get_spec(key: str | Any) -> FamilySpec:
    """The registered spec for a family name, ``model_type`` or config."""
    return REGISTRY.get(key)


__all__ = [
    "BUILTIN_FAMILIES",
    "COMPONENT_RULES",
    "Cuts",
    "REGIONS",
    "REGION_NAMES",
    "THIRDS",
    "check_region",
    "in_region",
    "locate_parameters",
    "parameters_in",
    "region_of",
    "vision_depths",
    "vision_depths_from_names",
    "FamilyRegistry",
    "FamilySpec",
    "LLAVA_STYLE_KEYS",
    "Location",
    "QWEN_STYLE_KEYS",
    "REGISTRY",
    "Region",
    "component_of",
    "get_spec",
    "register_family",
    "unified_index_label",
]
