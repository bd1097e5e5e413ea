"""Gemma3: SigLIP tower, pooled to a square grid of soft tokens, Gemma3 decoder with sliding windows."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="gemma3",
    display_name="Gemma3",
    model_types=("gemma3",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layers",),
    projector=("model.multi_modal_projector",),
    vision_root="model.vision_tower",
    grid="square",
    image_placeholder="<start_of_image>",
    legacy_keys=LLAVA_STYLE_KEYS,
)
