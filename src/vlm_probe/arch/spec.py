"""What a model family looks like, declared once: module paths, image-token rules, key names.

A :class:`FamilySpec` is pure data. The tracing layer resolves its module paths on a live
model (``model/``); the weight reader maps checkpoint tensor names through
:meth:`FamilySpec.module_path` and :meth:`FamilySpec.locate` without building a model
(``weights/``). Both use the same unified layer index:

* vision blocks ``-depth .. -1`` (all vision block lists concatenated in order),
* the projector ``0``,
* LLM decoder layers ``1 .. N`` (decoder index ``i`` is unified index ``i + 1``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import Literal

GridKind = Literal["qwen", "square", "anyres", "tiles", "single"]


class Region(str, Enum):
    """Where a tensor sits in the model, independent of the family."""

    VISION = "vision"
    VISION_OTHER = "vision_other"  # patch embeddings, position embeddings, final vision norm
    PROJECTOR = "projector"
    EMBED = "embed"
    LLM = "llm"
    FINAL_NORM = "final_norm"
    LM_HEAD = "lm_head"
    OTHER = "other"


#: Component names by module-path suffix, tried in order (first match wins).
COMPONENT_RULES: tuple[tuple[str, str], ...] = (
    (r"(self_attn|cross_attn|attention|attn)\.(q_proj|query|q)$", "q"),
    (r"(self_attn|cross_attn|attention|attn)\.(k_proj|key|k)$", "k"),
    (r"(self_attn|cross_attn|attention|attn)\.(v_proj|value|v)$", "v"),
    (r"(self_attn|cross_attn|attention|attn)\.(o_proj|out_proj|proj|projection_layer|dense)$", "o"),
    (r"attn\.qkv$", "qkv"),
    (r"mlp\.(gate_proj)$", "gate"),
    (r"mlp\.(up_proj|fc1|linear_fc1)$", "up"),
    (r"mlp\.(down_proj|fc2|linear_fc2)$", "down"),
    (r"(norm|layernorm|layer_norm|ln)[^.]*$", "norm"),
    (r"(gate|lambda)[^.]*$", "gate_scalar"),
)


@dataclass(frozen=True)
class Location:
    """Where one parameter tensor lives, in family-independent terms."""

    name: str  #: module-path name of the tensor, e.g. ``model.language_model.layers.3.mlp.up_proj.weight``
    region: Region
    layer: int | None  #: unified layer index (vision < 0, projector 0, LLM 1..N); None for other rows
    component: str  #: q, k, v, o, qkv, gate, up, down, norm, projector, embed, lm_head, other


@dataclass(frozen=True)
class FamilySpec:
    """Declarative description of one VLM family (paths relative to the HF model root)."""

    name: str
    display_name: str
    model_types: tuple[str, ...]
    decoder_layers: str
    embed: str
    final_norm: str
    vision_blocks: tuple[str, ...]
    projector: tuple[str, ...]
    vision_root: str
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    #: Mllama: the attention module name inside cross-attention layers
    cross_attn: str | None = None
    #: config attribute (on text_config) listing the decoder layers that are cross-attention layers
    cross_attention_layers_attr: str | None = None
    #: whether image tokens carry the image in the residual stream (False for Mllama)
    image_in_residual: bool = True
    #: whether a text token after the images influences no earlier position (False for
    #: PaliGemma's bidirectional prefix and Mllama's cross-attention): sweeps then rerun only
    #: the positions from the first patched one on, over the unpatched run's KV cache
    causal_text: bool = True
    #: how vision tokens map to cells of the image: see ``model.layout``
    grid: GridKind = "square"
    #: image placeholder to write in raw prompts (default: the processor's ``image_token``)
    image_placeholder: str | None = None
    #: positions are 3-D multimodal RoPE computed by the model (Qwen-VL): never pass ``position_ids``
    mrope: bool = False
    #: encoding fields with one entry per sample (not per image), zero-filled for text-only rows
    per_sample_fields: tuple[str, ...] = ()
    #: per-sample fields whose first entry on the last axis is 1 even for padding images
    #: (Mllama's ``aspect_ratio_mask``, as its processor pads it)
    first_tile_valid: tuple[str, ...] = ()
    #: checkpoint key renames (regex on the stored name -> module path), first match wins
    legacy_keys: tuple[tuple[str, str], ...] = ()
    #: where the text config lives on the model config
    text_config_attr: str = "text_config"

    # ------------------------------------------------------------------ key names

    @cached_property
    def _legacy(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((re.compile(pattern), repl) for pattern, repl in self.legacy_keys)

    def module_path(self, stored_name: str) -> str:
        """Map a checkpoint tensor name (transformers 4 or 5 naming) to its module-path name."""
        for pattern, repl in self._legacy:
            if pattern.search(stored_name):
                return pattern.sub(repl, stored_name, count=1)
        return stored_name

    # ------------------------------------------------------------------ regions

    @cached_property
    def _block_patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$") for prefix in self.vision_blocks)

    @cached_property
    def _decoder_pattern(self) -> re.Pattern[str]:
        return re.compile(rf"^{re.escape(self.decoder_layers)}\.(\d+)\.(.+)$")

    def locate(self, name: str, vision_depths: tuple[int, ...]) -> Location:
        """Place a module-path tensor name on the unified layer index.

        Args:
            name: module-path name (apply :meth:`module_path` to stored names first).
            vision_depths: number of blocks in each of :attr:`vision_blocks`, in order.
        """
        match = self._decoder_pattern.match(name)
        if match:
            return Location(name, Region.LLM, int(match.group(1)) + 1, component_of(match.group(2)))
        total = sum(vision_depths)
        offset = 0
        for pattern, depth in zip(self._block_patterns, vision_depths):
            match = pattern.match(name)
            if match:
                index = offset + int(match.group(1)) - total
                return Location(name, Region.VISION, index, component_of(match.group(2)))
            offset += depth
        module = name.rsplit(".", 1)[0]
        if any(name == p or module == p or module.startswith(p + ".") for p in self.projector):
            return Location(name, Region.PROJECTOR, 0, "projector")
        if module == self.embed or module.startswith(self.embed + "."):
            return Location(name, Region.EMBED, None, "embed")
        if module == self.final_norm:
            return Location(name, Region.FINAL_NORM, None, "norm")
        if module == self.lm_head:
            return Location(name, Region.LM_HEAD, None, "lm_head")
        if name.startswith(self.vision_root + "."):
            return Location(name, Region.VISION_OTHER, None, "vision_other")
        return Location(name, Region.OTHER, None, "other")


def component_of(relative: str) -> str:
    """Component of a tensor from its path inside a block (``mlp.up_proj.weight`` -> ``up``)."""
    module = relative.rsplit(".", 1)[0] if "." in relative else relative
    for pattern, component in COMPONENT_RULES:
        if re.search(pattern, module):
            return component
    return "other"


def unified_index_label(index: int) -> str:
    """Human label for a unified layer index: ``V3`` (vision), ``P`` (projector), ``L7`` (LLM)."""
    if index < 0:
        return f"V{index}"
    if index == 0:
        return "P"
    return f"L{index}"


# Common rename tables ------------------------------------------------------------------

LLAVA_STYLE_KEYS: tuple[tuple[str, str], ...] = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.", "model.language_model."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^vision_model\.", "model.vision_model."),
    (r"^multi_modal_projector", "model.multi_modal_projector"),
    (r"^image_newline", "model.image_newline"),
)

QWEN_STYLE_KEYS: tuple[tuple[str, str], ...] = (
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
    (r"^visual\.", "model.visual."),
)
