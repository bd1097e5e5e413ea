"""LLaVA: CLIP tower, fixed square patch grid, two-layer MLP projector."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="llava",
    display_name="LLaVA",
    model_types=("llava",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layers",),
    projector=("model.multi_modal_projector",),
    vision_root="model.vision_tower",
    grid="square",
    legacy_keys=LLAVA_STYLE_KEYS,
)
