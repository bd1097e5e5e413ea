"""vlm_probe: mechanistic interpretability of vision-language models.

Compare checkpoints of one VLM (Base, IN, RL) and localize what changed: causal probing,
residual-stream readouts, weight-space comparison and model surgery, all on one layer index.

    import vlm_probe
    vlm = vlm_probe.load("path/or/hub-id")
    batch = vlm.prepare("How many red shapes?", images=[img])
    with vlm.trace(batch):
        h = vlm.layers[3].output[:, batch.layout.vision].save()
"""

from . import arch, errors
from .arch import FamilySpec, register_family
from .model import VLM, Batch, CheckpointSet, TokenLayout, align, load, load_set

__version__ = "0.1.0"

__all__ = [
    "VLM",
    "Batch",
    "CheckpointSet",
    "FamilySpec",
    "TokenLayout",
    "align",
    "arch",
    "errors",
    "load",
    "load_set",
    "register_family",
]
