"""Qwen2.5-VL: Qwen2.5 decoder, windowed-attention ViT with fused qkv, 2x2 patch merger."""

from ..spec import QWEN_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.visual.blocks",),
    projector=("model.visual.merger",),
    vision_root="model.visual",
    grid="qwen",
    mrope=True,
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    legacy_keys=QWEN_STYLE_KEYS,
)
