"""PaliGemma: SigLIP tower, one linear projector, Gemma decoder with a bidirectional image prefix."""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="paligemma",
    display_name="PaliGemma",
    model_types=("paligemma",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_tower.encoder.layers",),
    projector=("model.multi_modal_projector",),
    vision_root="model.vision_tower",
    grid="square",
    causal_text=False,
    legacy_keys=LLAVA_STYLE_KEYS,
)
