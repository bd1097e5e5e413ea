"""LLaVA-OneVision: SigLIP tower, any-resolution tiles, Qwen2 decoder."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="llava_onevision",
    display_name="LLaVA-OneVision",
    model_types=("llava_onevision",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layers",),
    projector=("model.multi_modal_projector", "model.image_newline"),
    vision_root="model.vision_tower",
    grid="anyres",
    per_sample_fields=("batch_num_images",),
    legacy_keys=LLAVA_STYLE_KEYS,
)
