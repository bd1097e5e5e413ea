"""Greedy generation for evaluation runs: the shared implementation in
:mod:`vlm_probe.analyses.generation` (one explicit config for analyses and evaluation alike)."""

from ..analyses.generation import (
    Generation,
    Generator,
    GreedyGenerator,
    config_record,
    generation_defaults,
    greedy_config,
    placeholder_token_ids,
)

__all__ = [
    "Generation",
    "Generator",
    "GreedyGenerator",
    "config_record",
    "generation_defaults",
    "greedy_config",
    "placeholder_token_ids",
]
