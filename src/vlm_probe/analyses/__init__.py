"""Experiments built from the intervention primitives; each returns a tidy result object."""

from . import metrics
from .engine import AnswerLogprob, Greedy, Logits, Source, Variant, rerun, run
from .options import RunOptions
from .ablation import AblationResult, knockout_sweep, layer_ablation_sweep
from .attribution import AttributionResult, attribution_sweep, cross_attribution, cross_checkpoint_attribution
from .attention_mass import AttentionMassResult, attention_mass, token_attention
from .collect import Activations, collect
from .drift import DriftResult, representation_drift
from .lens import LensResult, TunedLens, compare_lenses, logit_lens
from .overlay import overlay_figure
from .patching import PatchingResult, answer_sweep, cross_checkpoint_sweep, cross_patch, layer_increments, sweep
from .probes import ProbeResult, probe_layers
from .swap import SwapResult, swap_pairs, vision_swap_sweep

__all__ = [
    "AblationResult",
    "AnswerLogprob",
    "Greedy",
    "Logits",
    "RunOptions",
    "Source",
    "Variant",
    "rerun",
    "run",
    "Activations",
    "AttentionMassResult",
    "AttributionResult",
    "DriftResult",
    "LensResult",
    "PatchingResult",
    "ProbeResult",
    "SwapResult",
    "TunedLens",
    "answer_sweep",
    "attention_mass",
    "attribution_sweep",
    "collect",
    "compare_lenses",
    "cross_attribution",
    "cross_checkpoint_attribution",
    "cross_checkpoint_sweep",
    "cross_patch",
    "knockout_sweep",
    "layer_ablation_sweep",
    "layer_increments",
    "logit_lens",
    "metrics",
    "overlay_figure",
    "probe_layers",
    "representation_drift",
    "swap_pairs",
    "sweep",
    "token_attention",
    "vision_swap_sweep",
]
