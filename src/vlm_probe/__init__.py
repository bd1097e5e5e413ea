"""vlm_probe: mechanistic interpretability of vision-language models.

Compare checkpoints of one VLM (Base, IN, RL) and localize what changed: causal probing,
residual-stream readouts, weight-space comparison and model surgery, all on one layer index.

    import vlm_probe
    vlm = vlm_probe.load("path/or/hub-id")
    batch = vlm.prepare("How many red shapes?", images=[img])
    with vlm.trace(batch):
        h = vlm.layers[3].output[:, batch.layout.vision].save()

Names are imported on first use, so ``import vlm_probe.weights`` (which never builds a model)
does not pay for transformers and nnsight.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "VLM": "vlm_probe.model",
    "Batch": "vlm_probe.model",
    "CheckpointSet": "vlm_probe.model",
    "TokenLayout": "vlm_probe.model",
    "align": "vlm_probe.model",
    "load": "vlm_probe.model",
    "load_set": "vlm_probe.model",
    "FamilySpec": "vlm_probe.arch",
    "register_family": "vlm_probe.arch",
}
_SUBMODULES = ("analyses", "arch", "errors", "evaluation", "interventions", "model", "report", "testbed", "weights")

__all__ = [*_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"vlm_probe.{name}")
    else:
        raise AttributeError(f"module 'vlm_probe' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
