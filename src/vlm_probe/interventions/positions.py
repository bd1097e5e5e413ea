"""Position specs -> ``[batch, seq]`` boolean masks.

Anywhere an intervention takes positions it accepts a :data:`PositionSpec`:

* a group name of the batch's layout (``"vision"``, ``"question"``, ``"last"``, ``"image0"``, ...),
* ``"all"`` (every non-pad position),
* an int or a sequence of ints (positions shared by every row; negative ints count from the end),
* a ``[batch, seq]`` boolean mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

import torch
from jaxtyping import Bool
from torch import Tensor

from ..errors import InputError
from ..model.inputs import Batch

PositionSpec = Union[str, int, Sequence[int], Tensor]

#: groups that hold image tokens (refused where the image is not in the residual stream)
IMAGE_GROUPS_PREFIX = ("vision", "image")


def resolve_positions(
    batch: Batch, spec: PositionSpec, *, vlm: Any = None, what: str = "this intervention"
) -> Bool[Tensor, "batch seq"]:
    """The ``[batch, seq]`` mask of the positions ``spec`` names in ``batch``.

    With ``vlm`` given, image-token groups are refused on families whose image tokens carry
    no image content (Mllama), since an intervention there would change nothing.
    """
    shape = tuple(batch.inputs["input_ids"].shape)
    if isinstance(spec, str):
        if vlm is not None and spec.startswith(IMAGE_GROUPS_PREFIX):
            vlm.require_image_positions(what)
        if spec == "all":
            return batch.inputs["attention_mask"].bool()
        return batch.layout.mask(spec)
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if tuple(spec.shape) != shape:
            raise InputError(f"A position mask must have the batch's shape {shape}; got {tuple(spec.shape)}.")
        return spec
    positions = [int(spec)] if isinstance(spec, int) else [int(p) for p in spec]
    width = shape[1]
    mask = torch.zeros(shape, dtype=torch.bool)
    for p in positions:
        if not -width <= p < width:
            raise InputError(f"Position {p} is outside the batch's {width} tokens.")
        mask[:, p] = True
    return mask


def positions_label(spec: PositionSpec) -> str:
    """A short label for a position spec, for result tables."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, int):
        return str(spec)
    if isinstance(spec, Tensor):
        return "mask" if spec.dtype == torch.bool else ",".join(str(int(p)) for p in spec.flatten())
    return ",".join(str(int(p)) for p in spec)
