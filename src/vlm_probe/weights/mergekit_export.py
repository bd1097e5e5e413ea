"""Exporting merge plans as mergekit YAML, for the plans mergekit can express.

mergekit (0.1.5) knows the module layout of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Gemma3 (its
``modules:`` syntax: ``text_decoder``, ``multi_modal_projector``, ``vision_tower``). Two kinds
of plans translate:

* layer splices (``swap`` rules over decoder layers): a ``passthrough`` merge of text-decoder
  slices. mergekit takes the embeddings from the first slice and the final norm and lm_head
  from the last, so a plan translates only when both of those slices come from the host
  (``IN:RL:IN`` does; ``IN:RL:RL`` keeps the host's head in vlm_probe but not in mergekit).
* one ``linear`` rule over ``all`` tensors: a ``linear`` merge with weights ``1 - alpha``/``alpha``.

Anything else raises :class:`~vlm_probe.errors.MergePlanError` saying why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from ..errors import MergePlanError
from .plans import MergePlan, in_region
from .reader import Checkpoint
from .regions import Cuts

MERGEKIT_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3")


def _layer_sources(plan: MergePlan, host: Checkpoint) -> list[str]:
    """The checkpoint supplying each decoder layer (every tensor of a layer must agree)."""
    cuts = Cuts.make(plan.cuts, host.n_layers)
    sources: dict[int, set[str]] = {}
    for entry in host.tensors.values():
        location = entry.location
        rule = plan.rule_for(location, cuts)
        if location.region.value == "llm":
            sources.setdefault(location.layer - 1, set()).add(rule.source if rule else plan.host)  # type: ignore[operator]
        elif rule is not None:
            raise MergePlanError(
                f"mergekit export: the plan replaces {entry.name} outside the decoder layers; mergekit's passthrough "
                "slices cannot express that."
            )
    out = []
    for layer in range(host.n_layers):
        names = sources.get(layer, {plan.host})
        if len(names) != 1:
            raise MergePlanError(f"mergekit export: decoder layer {layer} takes tensors from {sorted(names)}; "
                                 "passthrough slices move whole layers.")
        out.append(names.pop())
    return out


def to_mergekit(plan: MergePlan, checkpoints: Mapping[str, Checkpoint], *, dtype: str | None = None) -> dict[str, Any]:
    """The mergekit configuration (a dict; ``yaml.safe_dump`` it) equivalent to ``plan``.

    Args:
        checkpoints: opened checkpoints; their paths become mergekit model references.
        dtype: mergekit ``dtype`` (default: the host's stored dtype).
    """
    host = checkpoints[plan.host]
    if host.spec.name not in MERGEKIT_FAMILIES:
        raise MergePlanError(
            f"mergekit has no module definitions for {host.spec.display_name} (it knows "
            f"{', '.join(MERGEKIT_FAMILIES)}); write this merge with vlm_probe.weights.write_merge instead."
        )
    first = next(iter(host.tensors.values()))
    dtype = dtype or str(first.dtype).replace("torch.", "")
    path = {name: str(c.path) for name, c in checkpoints.items()}
    if len(plan.rules) == 1 and plan.rules[0].method == "linear" and plan.rules[0].regions == ("all",):
        rule = plan.rules[0]
        return {"merge_method": "linear", "dtype": dtype,
                "models": [{"model": path[plan.host], "parameters": {"weight": 1 - rule.alpha}},
                           {"model": path[rule.source], "parameters": {"weight": rule.alpha}}]}
    if any(rule.method != "swap" for rule in plan.rules):
        raise MergePlanError("mergekit export covers layer swaps and one whole-model linear rule; this plan mixes "
                             "other methods or regions.")
    sources = _layer_sources(plan, host)
    if sources[0] != plan.host or sources[-1] != plan.host:
        raise MergePlanError(
            "mergekit's passthrough takes the embeddings from the first text slice and the final norm and lm_head "
            f"from the last; here they come from {sources[0]} and {sources[-1]}, but the plan keeps them from the "
            f"host {plan.host}. mergekit cannot express this plan; write it with write_merge."
        )
    slices = []
    start = 0
    for layer in range(1, len(sources) + 1):
        if layer == len(sources) or sources[layer] != sources[start]:
            slices.append({"sources": [{"model": path[sources[start]], "layer_range": [start, layer]}]})
            start = layer
    vision_layers = sum(host.vision_depths)
    whole = lambda n: {"slices": [{"sources": [{"model": path[plan.host], "layer_range": [0, n]}]}]}  # noqa: E731
    return {"merge_method": "passthrough", "dtype": dtype,
            "modules": {"text_decoder": {"slices": slices},
                        "multi_modal_projector": whole(2),
                        "vision_tower": whole(vision_layers)}}


def mergekit_yaml(plan: MergePlan, checkpoints: Mapping[str, Checkpoint], **kwargs: Any) -> str:
    return yaml.safe_dump(to_mergekit(plan, checkpoints, **kwargs), sort_keys=False)


def region_covered(plan: MergePlan, checkpoint: Checkpoint, region: str) -> bool:
    """Whether any rule of ``plan`` touches ``region`` (for messages)."""
    cuts = Cuts.make(plan.cuts, checkpoint.n_layers)
    return any(in_region(e.location, region, cuts) and plan.rule_for(e.location, cuts) is not None
               for e in checkpoint.tensors.values())
