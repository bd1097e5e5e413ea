"""The tracing layer: loading, the nnsight wrapper, standard sites, token layouts, checkpoint sets."""

from .checkpoint_set import CheckpointSet, load_set
from .inputs import Batch, ForwardInputs, align
from .layout import BatchLayout, TileGrid, TokenLayout, VisionCell
from .loading import load
from .processors import load_processor, save_processor
from .sites import DecoderLayer
from .wrapper import VLM

__all__ = [
    "Batch",
    "BatchLayout",
    "CheckpointSet",
    "DecoderLayer",
    "ForwardInputs",
    "TileGrid",
    "TokenLayout",
    "VLM",
    "VisionCell",
    "align",
    "load",
    "load_processor",
    "load_set",
    "save_processor",
]
