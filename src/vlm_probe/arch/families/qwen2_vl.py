"""Qwen2-VL: Qwen2 decoder, ViT with fused qkv, 2x2 patch merger; mRoPE positions."""

from ..spec import QWEN_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    model_types=("qwen2_vl",),
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
