"""Experiments built from the intervention primitives; each returns a tidy result object."""

from . import metrics
from .patching import PatchingResult, answer_sweep, cross_checkpoint_sweep, cross_patch, layer_increments, sweep

__all__ = ["PatchingResult", "answer_sweep", "cross_checkpoint_sweep", "cross_patch", "layer_increments", "metrics", "sweep"]
