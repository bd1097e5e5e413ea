"""Position specs -> ``[batch, seq]`` boolean masks.

Anywhere an intervention takes positions it accepts a :data:`PositionSpec`:

* a group name of the batch's layout (``"vision"``, ``"question"``, ``"last"``, ``"image0"``, ...),
* ``"all"`` (every non-pad position),
* an int or a sequence of ints (positions shared by every row; negative ints count from the end),
* a ``[batch, seq]`` boolean mask (``seq`` may run past the prompt to name generated tokens),
* for attention edges, ``"generated"``: the last prompt position and every generated token.
"""

from __future__ import annotations

import hashlib
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
        mask = batch.layout.mask(spec)
        if not bool(mask.any()):
            present = [name for name in batch.layout.names() if bool(batch.layout.mask(name).any())]
            hint = " (a text-only batch has no image tokens)" if spec.startswith(IMAGE_GROUPS_PREFIX) else ""
            raise InputError(
                f"{what}: token group {spec!r} is empty in every sample of this batch{hint}, so the result would "
                f"be all zeros. Use a group the batch holds: {', '.join(present)}."
            )
        return mask
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        if spec.dim() == 2 and spec.shape[0] == shape[0] and spec.shape[1] > shape[1]:
            if bool(spec[:, shape[1]:].any()):
                raise InputError("This position mask names positions past the prompt; only attention edges take those.")
            spec = spec[:, : shape[1]]
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
    """A short label for a position spec, for result tables; different masks get different
    labels (``mask:<8 hex digits of a hash of the mask>``)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, int):
        return str(spec)
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool:
            digest = hashlib.sha1(str(tuple(spec.shape)).encode() + spec.cpu().numpy().tobytes()).hexdigest()
            return f"mask:{digest[:8]}"
        return ",".join(str(int(p)) for p in spec.flatten())
    return ",".join(str(int(p)) for p in spec)


def positions_to_json(spec: PositionSpec) -> Any:
    """A JSON-ready form of a position spec (a mask becomes ``{"mask": [[columns of row 0], ...], "width": w}``)."""
    if isinstance(spec, Tensor):
        if spec.dtype == torch.bool:
            return {"mask": [row.nonzero().flatten().tolist() for row in spec.cpu()], "width": int(spec.shape[1])}
        return [int(p) for p in spec.flatten()]
    if isinstance(spec, (str, int)):
        return spec
    return [int(p) for p in spec]


def positions_from_json(data: Any) -> PositionSpec:
    """The position spec :func:`positions_to_json` wrote."""
    if isinstance(data, dict):
        mask = torch.zeros(len(data["mask"]), int(data["width"]), dtype=torch.bool)
        for row, columns in enumerate(data["mask"]):
            mask[row, columns] = True
        return mask
    return tuple(data) if isinstance(data, list) else data


def column_mask(
    batch: Batch | None, spec: PositionSpec, columns: Tensor, *, vlm: Any = None, what: str = "this intervention"
) -> Bool[Tensor, "batch n"]:
    """Whether each row's absolute ``columns`` (which may lie past the prompt, at generated
    tokens) are among the positions ``spec`` names; ``"generated"`` names the last prompt
    position and every later column. ``batch`` may be ``None`` when ``spec`` is a mask."""
    columns = columns.long().cpu()
    if isinstance(spec, Tensor) and spec.dtype == torch.bool and (batch is None or spec.shape[0] == len(batch)):
        if spec.dim() != 2 or (batch is not None and spec.shape[1] < batch.width):
            width = "total" if batch is None else f">= {batch.width}"
            raise InputError(
                f"{what}: a position mask must be [batch, total] with total {width} (the padded batch's columns, "
                f"and optionally generated ones); got shape {tuple(spec.shape)}. Build it from "
                "batch.layout.mask(group) or pass a group name or a list of positions."
            )
        mask = spec.cpu()
    elif batch is None:
        raise InputError(f"{what}: a position spec other than a [batch, total] mask needs the batch.")
    elif isinstance(spec, str) and spec == "generated":
        last = torch.tensor([row.spans["last_prompt"][0] for row in batch.layout])
        return columns[None, :] >= last[:, None]
    else:
        mask = resolve_positions(batch, spec, vlm=vlm, what=what)
    width = mask.shape[1]
    inside = columns < width
    out = torch.zeros(mask.shape[0], len(columns), dtype=torch.bool)
    out[:, inside] = mask[:, columns[inside]]
    return out
