"""InternVL: InternViT tower (``encoder.layer``, singular), pixel-shuffle MLP projector, tiles."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="internvl",
    display_name="InternVL",
    model_types=("internvl",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layer",),
    projector=("model.multi_modal_projector",),
    vision_root="model.vision_tower",
    grid="tiles",
    legacy_keys=LLAVA_STYLE_KEYS,
)
