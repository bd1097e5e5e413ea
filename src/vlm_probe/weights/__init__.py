"""Weight-space comparison of checkpoints without building a model.

Streams safetensors checkpoints tensor by tensor (transformers-4 and -5 key names alike),
places every tensor on the unified layer index, and measures each step of a chain of
checkpoints (Base -> IN -> RL): delta norms, relative norms, energy shares by region,
singular spectra (exact or randomized with an error bound) and the overlap between two
updates of the same tensor (cosine, sign agreement, principal angles).

    from vlm_probe.weights import compare_weights
    result = compare_weights({"Base": base_dir, "IN": in_dir, "RL": rl_dir}, cuts=(8, 20))
    result.by_region(); result.plot()

This package never imports :mod:`vlm_probe.model`.
"""

from .compare import NonFiniteWeightsWarning, compare_weights, open_checkpoints
from .reader import (
    Checkpoint,
    CorruptCheckpointError,
    MissingShardError,
    TensorEntry,
    open_checkpoint,
    resolve_checkpoint_dir,
)
from .regions import REGIONS, Cuts
from .result import WeightComparison
from .spectra import SVDConfig

__all__ = [
    "REGIONS",
    "Checkpoint",
    "CorruptCheckpointError",
    "Cuts",
    "MissingShardError",
    "NonFiniteWeightsWarning",
    "SVDConfig",
    "TensorEntry",
    "WeightComparison",
    "compare_weights",
    "open_checkpoint",
    "open_checkpoints",
    "resolve_checkpoint_dir",
]
