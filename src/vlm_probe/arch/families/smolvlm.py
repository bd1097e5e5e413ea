"""SmolVLM: SigLIP-style tower, pixel-shuffle connector, image split into tiles plus a global view."""

from ..spec import FamilySpec

SPEC = FamilySpec(
    name="smolvlm",
    display_name="SmolVLM",
    model_types=("smolvlm",),
    decoder_layers="model.text_model.layers",
    embed="model.text_model.embed_tokens",
    final_norm="model.text_model.norm",
    vision_blocks=("model.vision_model.encoder.layers",),
    projector=("model.connector",),
    vision_root="model.vision_model",
    grid="tiles",
    per_sample_fields=("pixel_values", "pixel_attention_mask"),
    legacy_keys=(
        (r"^text_model\.", "model.text_model."),
        (r"^vision_model\.", "model.vision_model."),
        (r"^connector\.", "model.connector."),
    ),
)
