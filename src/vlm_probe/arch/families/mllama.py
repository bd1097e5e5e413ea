"""Mllama (Llama 3.2 Vision): the image enters only through gated cross-attention layers.

Its single ``<|image|>`` token carries no image content in the residual stream, so
interventions at image positions would silently do nothing; the wrapper refuses them.
"""

from ..spec import LLAVA_STYLE_KEYS, FamilySpec

SPEC = FamilySpec(
    name="mllama",
    display_name="Mllama (Llama 3.2 Vision)",
    model_types=("mllama",),
    decoder_layers="model.language_model.layers",
    embed="model.language_model.embed_tokens",
    final_norm="model.language_model.norm",
    vision_blocks=("model.vision_model.transformer.layers", "model.vision_model.global_transformer.layers"),
    projector=("model.multi_modal_projector",),
    vision_root="model.vision_model",
    cross_attn="cross_attn",
    cross_attention_layers_attr="cross_attention_layers",
    image_in_residual=False,
    grid="single",
    per_sample_fields=("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"),
    first_tile_valid=("aspect_ratio_mask",),
    causal_text=False,
    legacy_keys=LLAVA_STYLE_KEYS,
)
