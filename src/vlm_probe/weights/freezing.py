"""Freezing plans applied to a model, and exported for PEFT, TRL and verl.

The necessity experiment freezes blocks during RL and measures what is lost. A
:class:`~vlm_probe.weights.plans.FreezePlan` names regions (``early``, ``mid``, ``late``,
``vision``, ``layers:A-B``, ...); here it becomes ``requires_grad`` masks on a live model (with
a summary of trainable parameters by region), PEFT's ``layers_to_transform``, and regular
expressions over parameter names for trainers that take them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from ..arch import FamilySpec, Location, Region
from ..arch.regions import Cuts, locate_parameters, n_decoder_layers, region_of, vision_depths
from .plans import FreezePlan

__all__ = ["FreezeSummary", "apply_freeze", "frozen", "frozen_parameter_names", "locate_parameters", "name_patterns",
           "peft_layers_to_transform", "summarize", "vision_depths"]


def _n_layers(model: torch.nn.Module, spec: FamilySpec) -> int:
    return n_decoder_layers(model, spec)


@dataclass
class FreezeSummary:
    """Trainable and frozen parameter counts by region."""

    frame: pd.DataFrame

    @property
    def trainable(self) -> int:
        return int(self.frame["trainable"].sum())

    @property
    def frozen(self) -> int:
        return int(self.frame["frozen"].sum())

    def __str__(self) -> str:
        return self.frame.to_string(index=False)


def frozen_parameter_names(model: torch.nn.Module, plan: FreezePlan, spec: FamilySpec) -> list[str]:
    """Names of the parameters ``plan`` freezes in ``model``."""
    cuts = Cuts.make(plan.cuts, _n_layers(model, spec))
    return [name for name, loc in locate_parameters(model, spec).items() if plan.is_frozen(loc, cuts)]


def summarize(model: torch.nn.Module, spec: FamilySpec, cuts: Any = None) -> FreezeSummary:
    """Trainable/frozen parameter counts of ``model`` by coarse region."""
    cuts = cuts if isinstance(cuts, Cuts) else Cuts.make(cuts, _n_layers(model, spec))
    rows: dict[str, dict[str, int]] = {}
    params = dict(model.named_parameters())
    for name, loc in locate_parameters(model, spec).items():
        region = region_of(loc, cuts)
        row = rows.setdefault(region, {"trainable": 0, "frozen": 0})
        row["trainable" if params[name].requires_grad else "frozen"] += params[name].numel()
    frame = pd.DataFrame([{"region": r, **v} for r, v in rows.items()])
    return FreezeSummary(frame)


def apply_freeze(model: torch.nn.Module, plan: FreezePlan, spec: FamilySpec) -> FreezeSummary:
    """Set ``requires_grad=False`` on the plan's parameters (and True on the rest) and summarize."""
    frozen = set(frozen_parameter_names(model, plan, spec))
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return summarize(model, spec, plan.cuts)


@contextlib.contextmanager
def frozen(model: torch.nn.Module, plan: FreezePlan, spec: FamilySpec) -> Iterator[FreezeSummary]:
    """:func:`apply_freeze` for the block only; every parameter's ``requires_grad`` is restored on exit."""
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        yield apply_freeze(model, plan, spec)
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(before[name])


def peft_layers_to_transform(plan: FreezePlan, n_layers: int) -> list[int]:
    """The decoder layers a PEFT adapter should train (``LoraConfig(layers_to_transform=...)``):
    those whose layer is not frozen by the plan."""
    cuts = Cuts.make(plan.cuts, n_layers)
    out = []
    for decoder in range(n_layers):
        location = Location(name="", region=Region.LLM, layer=decoder + 1, component="other")
        if not plan.is_frozen(location, cuts):
            out.append(decoder)
    return out


def name_patterns(plan: FreezePlan, spec: FamilySpec, n_layers: int) -> list[str]:
    """Regular expressions matching the names of the frozen parameters (module paths).

    Use them with any trainer that takes name patterns, or freeze by hand::

        patterns = [re.compile(p) for p in name_patterns(plan, spec, n)]
        for name, p in model.named_parameters():
            p.requires_grad_(not any(r.search(name) for r in patterns))
    """
    patterns: list[str] = []
    layers = [d for d in range(n_layers) if d not in peft_layers_to_transform(plan, n_layers)]
    if layers:
        alternatives = "|".join(str(d) for d in layers)
        patterns.append(rf"^{re.escape(spec.decoder_layers)}\.({alternatives})\.")
    simple = {"projector": list(spec.projector), "embed": [spec.embed], "final_norm": [spec.final_norm],
              "lm_head": [spec.lm_head], "head": [spec.final_norm, spec.lm_head]}
    inner = [p[len(spec.vision_root) + 1 :] for p in spec.projector if p.startswith(spec.vision_root + ".")]
    for region in plan.frozen:
        for prefix in simple.get(region, []):
            patterns.append(rf"^{re.escape(prefix)}(\.|$)")
        if region == "vision":  # the tower, less a projector that lives inside it (Qwen's merger)
            exclude = "".join(rf"(?!{re.escape(rel)}(\.|$))" for rel in inner)
            patterns.append(rf"^{re.escape(spec.vision_root)}\.{exclude}")
        if region == "all":
            patterns.append(r".*")
    return list(dict.fromkeys(patterns))
