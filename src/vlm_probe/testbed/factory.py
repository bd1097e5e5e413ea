"""The testbed's untrained model: a zoo model with the initialisation and RoPE base it trains with.

Initialisation: HF initialises every linear layer with a standard deviation of 0.02, which
for layers 64-256 wide is several times smaller than ``1 / sqrt(fan_in)``; a model that
small then sits on a long plateau before attention learns to pick out one image token
(colour of a single shape stayed at chance for 200 steps). Re-drawing linear and
convolution weights from ``N(0, 1 / fan_in)`` (embeddings and norms untouched) left the
plateau after about 80 steps.

RoPE base:Qwen2.5-VL splits each attention head's rotary frequencies into temporal, height and width
sections, highest frequencies first; the width section gets the lowest ones. With a head
dimension of 32 and the usual base of 10 000, neighbouring columns of a 4 x 4 image differ
by at most 0.003 rad in the width section, so "row 2 column 3" is nearly invisible to
attention and cell-binding questions stay at chance for hundreds of steps. A small base
(10) spreads the sections over 0.1-1 rad per position; sequences here stay under about 130
tokens, so text positions remain distinguishable.

Vision positions: a LLaVA tower's learned position table drawn at random gives every cell an
unrelated code, so "which column" must be learned cell by cell (held-out `column_of` 0.53
after 1600 Base steps). Factorised codes, row code plus column code (:func:`grid_positions`),
let what is learned about one cell carry over to its row and column (0.85 after 800 steps).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import get_spec
from ..errors import InputError, SpecMismatchError
from .zoo import Sizes, TinyVLM, tiny_vlm


def set_text_rope_theta(model: Any, theta: float) -> None:
    """Set the language model's RoPE base in its config and rebuild its rotary embedding.

    Meant for freshly built models (the weights do not depend on the base; the saved
    config carries it, so reloaded checkpoints agree).
    """
    spec = get_spec(model.config)
    text_config = model.config.get_text_config()
    params = dict(text_config.rope_parameters)
    params["rope_theta"] = float(theta)
    text_config.rope_parameters = params
    root = spec.decoder_layers.rsplit(".", 1)[0]
    try:
        rotary = model.get_submodule(f"{root}.rotary_emb")
    except AttributeError:
        raise SpecMismatchError(
            f"{spec.display_name}: no rotary embedding at {root}.rotary_emb, so the RoPE base cannot be set; "
            "build this family with rope_theta=None."
        ) from None
    parent = model.get_submodule(root)
    parent.rotary_emb = type(rotary)(config=text_config)


@torch.no_grad()
def fan_in_init(model: torch.nn.Module, seed: int, gain: float = 1.0) -> None:
    """Re-draw every linear and convolution weight from ``N(0, gain^2 / fan_in)`` (biases zeroed)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * gain / math.sqrt(fan_in))
            if module.bias is not None:
                module.bias.zero_()


#: How :func:`vision_position_init` lays out the re-drawn position embeddings.
POSITION_LAYOUTS: tuple[str, ...] = ("grid", "random")


def grid_positions(n_rows: int, d: int, std: float, generator: torch.Generator) -> Float[Tensor, "n_rows d"]:
    """Factorised 2-D position codes for a square patch grid in row-major order: patch ``(r, c)``
    gets ``(row[r] + column[c]) / sqrt(2)`` with ``row`` and ``column`` drawn from ``N(0, std^2)``
    (so every entry has variance ``std^2``); a leading class-token row (``n_rows = g^2 + 1``) gets
    its own draw."""
    side = math.isqrt(n_rows)
    has_cls = side * side != n_rows
    if has_cls:
        side = math.isqrt(n_rows - 1)
        if side * side != n_rows - 1:
            raise InputError(
                f"A position table of {n_rows} rows is neither a square patch grid nor one plus a square grid; "
                "use position_layout='random' for this tower."
            )
    rows = torch.randn(side, d, generator=generator) * std
    columns = torch.randn(side, d, generator=generator) * std
    index = torch.arange(side * side)
    grid = (rows[index // side] + columns[index % side]) / math.sqrt(2)
    if has_cls:
        grid = torch.cat([torch.randn(1, d, generator=generator) * std, grid])
    return grid


@torch.no_grad()
def vision_position_init(model: torch.nn.Module, seed: int, std: float, layout: str = "grid") -> list[str]:
    """Re-draw the vision tower's learned absolute position embeddings; returns the names of the
    tables changed (none for towers without them, e.g. Qwen2.5-VL).

    ``layout="random"`` draws every row from ``N(0, std^2)``; ``"grid"`` draws factorised row and
    column codes (:func:`grid_positions`), so that what the model learns about one cell's row
    or column carries over to the other cells of that row or column.
    """
    if layout not in POSITION_LAYOUTS:
        raise InputError(f"Unknown position layout {layout!r}; use one of {', '.join(POSITION_LAYOUTS)}.")
    spec = get_spec(model.config)
    tower = spec.vision_blocks[0].rsplit(".", 2)[0] if spec.vision_blocks else None
    generator = torch.Generator().manual_seed(seed + 1)
    changed = []
    for name, module in model.named_modules():
        inside = tower is not None and name.startswith(tower)
        if inside and isinstance(module, torch.nn.Embedding) and ("position" in name or "pos_embed" in name):
            shape = module.weight.shape
            if layout == "grid":
                module.weight.copy_(grid_positions(shape[0], shape[1], std, generator))
            else:
                module.weight.copy_(torch.randn(shape, generator=generator) * std)
            changed.append(name)
    return changed


def testbed_model(
    family: str,
    *,
    seed: int,
    sizes: Sizes,
    rope_theta: float | None = None,
    init_gain: float | None = None,
    position_std: float | None = None,
    position_layout: str = "grid",
) -> TinyVLM:
    """A random tiny model of ``family`` (:func:`~vlm_probe.testbed.zoo.tiny_vlm`).

    LLaVA-style models read the vision tower's last layer (``vision_feature_layer=-1``) rather than
    the second-to-last, so every block of the two-block tower is used.

    Args:
        rope_theta: the language model's RoPE base (None: the zoo's).
        init_gain: re-initialise linear and convolution weights with :func:`fan_in_init`
            (None: keep HF's initialisation).
        position_std: re-draw the vision tower's learned position embeddings with this standard
            deviation (:func:`vision_position_init`; None: keep HF's).
    """
    tiny = tiny_vlm(family, seed=seed, **dataclasses.asdict(sizes))
    if getattr(tiny.model.config, "vision_feature_layer", None) == -2:
        # LLaVA reads the tower's second-to-last layer, which leaves a tiny tower's last block unused
        # (never trained, no gradient): read the last one
        tiny.model.config.vision_feature_layer = -1
    if rope_theta is not None:
        set_text_rope_theta(tiny.model, rope_theta)
    if init_gain is not None:
        fan_in_init(tiny.model, seed, init_gain)
    if position_std is not None:
        vision_position_init(tiny.model, seed, position_std, position_layout)
    return tiny
