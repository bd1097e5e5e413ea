"""LLaVA-NeXT: CLIP tower, any-resolution tiles plus a base view, newline tokens between rows."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="llava_next",
    display_name="LLaVA-NeXT",
    model_types=("llava_next",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layers",),
    projector=("model.multi_modal_projector", "model.image_newline"),
    vision_root="model.vision_tower",
    grid="anyres",
    legacy_keys=LLAVA_STYLE_KEYS,
)
