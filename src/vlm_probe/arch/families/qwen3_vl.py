"""Qwen3-VL: Qwen3 decoder, ViT with learned position grid, merger plus deepstack mergers."""

from ..spec import QWEN_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="qwen3_vl",
    display_name="Qwen3-VL",
    model_types=("qwen3_vl",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.visual.blocks",),
    projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
    vision_root="model.visual",
    grid="qwen",
    mrope=True,
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    legacy_keys=QWEN_STYLE_KEYS,
)
