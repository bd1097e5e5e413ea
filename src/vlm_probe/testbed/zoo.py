"""Tiny random VLMs of every supported family, built offline with real processors.

``tiny_vlm("qwen2_5_vl")`` returns a :class:`TinyVLM`: a randomly initialised HF model
of the real class (a few hundred thousand parameters), its processor (real processor
class, word-level tokenizer, small images) and the chat template. The zero-init traps of
random Gemma3 and Mllama models (the image would have no effect at all) are fixed.
``TinyVLM.save(path)`` writes an ordinary HF checkpoint directory that
``vlm_probe.load(path)`` and ``from_pretrained`` open.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from ..errors import UnknownFamilyError
from ..model.processors import build_processor, save_processor
from .tokenizer import word_level_tokenizer

# ----------------------------------------------------------------------------- chat templates


def _chat_template(
    *, bos: str = "", open_: str, close: str, image: str, generation: str, roles: dict[str, str] | None = None
) -> str:
    """A Jinja chat template: ``open_``/``close`` wrap each turn (``{role}`` is substituted)."""
    def lit(text: str) -> str:  # newlines as expressions: chat rendering trims them after tags
        return text.replace("\n", "{{ '\\n' }}")

    open_, close, image, generation = lit(open_), lit(close), lit(image), lit(generation)
    role = "{{ message['role'] }}"
    if roles:
        role = "{{ " + repr(roles) + "[message['role']] }}"
    return (
        bos
        + "{% for message in messages %}"
        + open_.replace("{role}", role)
        + "{% if message['content'] is string %}{{ message['content'] }}"
        + "{% else %}{% for c in message['content'] %}"
        + "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        + "{% endfor %}{% endif %}"
        + close
        + "{% endfor %}"
        + "{% if add_generation_prompt %}" + generation + "{% endif %}"
    )


CHATML_QWEN = _chat_template(
    open_="<|im_start|>{role}\n",
    close="<|im_end|>\n",
    image="<|vision_start|><|image_pad|><|vision_end|>",
    generation="<|im_start|>assistant\n",
)
CHATML_IMAGE = _chat_template(
    open_="<|im_start|>{role}\n", close="<|im_end|>\n", image="<image>", generation="<|im_start|>assistant\n"
)
LLAVA_TEMPLATE = _chat_template(
    open_="{role}: ",
    close="\n",
    image="<image>\n",
    generation="ASSISTANT:",
    roles={"system": "SYSTEM", "user": "USER", "assistant": "ASSISTANT"},
)
IDEFICS_TEMPLATE = _chat_template(
    bos="<|begin_of_text|>",
    open_="{role}:",
    close="<end_of_utterance>\n",
    image="<image>",
    generation="Assistant:",
    roles={"system": "System", "user": "User", "assistant": "Assistant"},
)
GEMMA_TEMPLATE = _chat_template(
    bos="<bos>",
    open_="<start_of_turn>{role}\n",
    close="<end_of_turn>\n",
    image="<start_of_image>",
    generation="<start_of_turn>model\n",
    roles={"system": "user", "user": "user", "assistant": "model"},
)
INTERNVL_TEMPLATE = _chat_template(
    open_="<|im_start|>{role}\n", close="<|im_end|>\n", image="<image>\n", generation="<|im_start|>assistant\n"
)
MLLAMA_TEMPLATE = _chat_template(
    bos="<|begin_of_text|>",
    open_="<|start_header_id|>{role}<|end_header_id|>\n\n",
    close="<|eot_id|>",
    image="<|image|>",
    generation="<|start_header_id|>assistant<|end_header_id|>\n\n",
)

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Sizes:
    """Dimensions of a tiny model. Defaults give about 0.2-0.3 M parameters."""

    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 128
    vision_d: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp: int = 64
    patch: int = 8
    image_size: int = 32

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def _text(sizes: Sizes, vocab: int, tok: Any, **extra: Any) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=sizes.d_model,
        intermediate_size=sizes.d_mlp,
        num_hidden_layers=sizes.n_layers,
        num_attention_heads=sizes.n_heads,
        num_key_value_heads=sizes.n_kv_heads,
        head_dim=sizes.head_dim,
        max_position_embeddings=1024,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def _vision(sizes: Sizes, **extra: Any) -> dict[str, Any]:
    return dict(
        hidden_size=sizes.vision_d,
        intermediate_size=sizes.vision_mlp,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch,
        **extra,
    )


@dataclass(frozen=True)
class Recipe:
    """How to build one family's tiny model, tokenizer and processor."""

    family: str
    model_cls: str
    config_cls: str
    processor_cls: str
    special_tokens: dict[str, str]
    chat_template: str
    config: Callable[[Sizes, int, Any], dict[str, Any]]
    processor: Callable[[Sizes, Any], dict[str, Any]]
    extra_special: tuple[str, ...] = ()
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    #: a (height, width) that exercises non-square grids where the family allows it
    image_hw: Callable[[Sizes], tuple[int, int]] = lambda s: (s.image_size, s.image_size)


def _ip(name: str, **kwargs: Any) -> Any:
    return getattr(transformers, name)(**kwargs)


def _qwen_config(version: str) -> Callable[[Sizes, int, Any], dict[str, Any]]:
    def config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
        vision: dict[str, Any] = dict(
            depth=s.vision_layers,
            hidden_size=s.vision_d,
            intermediate_size=s.vision_mlp,
            num_heads=s.vision_heads,
            patch_size=s.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=s.d_model,
        )
        text = _text(s, vocab, tok)
        half = s.head_dim // 2
        section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
        if version == "2":
            vision.update(embed_dim=s.vision_d, mlp_ratio=2, hidden_size=s.d_model)
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        elif version == "2.5":
            vision.update(window_size=4 * s.patch, fullatt_block_indexes=[s.vision_layers - 1])
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        else:
            vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
            text["rope_parameters"] = {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": section,
                "mrope_interleaved": True,
            }
        return dict(
            text_config=text,
            vision_config=vision,
            image_token_id=tok.image_token_id,
            video_token_id=tok.video_token_id,
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            tie_word_embeddings=False,
        )

    return config


def _qwen_processor(s: Sizes, tok: Any) -> dict[str, Any]:
    unit = s.patch * 2
    return dict(
        image_processor=_ip(
            "Qwen2VLImageProcessorPil",
            patch_size=s.patch,
            merge_size=2,
            temporal_patch_size=2,
            min_pixels=unit * unit,
            max_pixels=unit * unit * 64,
        ),
        tokenizer=tok,
    )


QWEN_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


def _clip_processor(s: Sizes, name: str = "CLIPImageProcessorPil", **extra: Any) -> Any:
    return _ip(
        name,
        size={"shortest_edge": s.image_size},
        crop_size={"height": s.image_size, "width": s.image_size},
        **extra,
    )


def _llava_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    return dict(
        text_config={"model_type": "llama", **_text(s, vocab, tok)},
        vision_config={"model_type": "clip_vision_model", **_vision(s), "projection_dim": s.d_model},
        image_token_id=tok.image_token_id,
        image_seq_length=(s.image_size // s.patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def _pinpoints(s: Sizes) -> list[list[int]]:
    n = s.image_size
    return [[n, 2 * n], [2 * n, n], [2 * n, 2 * n]]


def _llava_next_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    config = _llava_config(s, vocab, tok)
    config["image_grid_pinpoints"] = _pinpoints(s)
    return config


def _onevision_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    return dict(
        text_config={"model_type": "qwen2", **_text(s, vocab, tok)},
        vision_config={"model_type": "siglip_vision_model", **_vision(s)},
        image_token_id=tok.image_token_id,
        video_token_id=tok.video_token_id,
        image_grid_pinpoints=_pinpoints(s),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def _idefics_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    return dict(
        text_config={"model_type": "llama", **_text(s, vocab, tok)},
        vision_config=_vision(s),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _idefics_processor(name: str) -> Callable[[Sizes, Any], dict[str, Any]]:
    def processor(s: Sizes, tok: Any) -> dict[str, Any]:
        return dict(
            image_processor=_ip(
                name,
                size={"longest_edge": 2 * s.image_size},
                max_image_size={"longest_edge": s.image_size},
                do_image_splitting=True,
            ),
            tokenizer=tok,
            image_seq_len=(s.image_size // s.patch) ** 2 // 4,
        )

    return processor


IDEFICS_EXTRA = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>", "<|begin_of_text|>") + tuple(
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
)


def _paligemma_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    n_tokens = (s.image_size // s.patch) ** 2
    return dict(
        text_config={"model_type": "gemma", **_text(s, vocab, tok), "num_image_tokens": n_tokens},
        vision_config={"model_type": "siglip_vision_model", **_vision(s), "projection_dim": s.d_model},
        image_token_id=tok.image_token_id,
        projection_dim=s.d_model,
        hidden_size=s.d_model,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def _paligemma_processor(s: Sizes, tok: Any) -> dict[str, Any]:
    image_processor = _ip("SiglipImageProcessorPil", size={"height": s.image_size, "width": s.image_size})
    image_processor.image_seq_length = (s.image_size // s.patch) ** 2
    return dict(image_processor=image_processor, tokenizer=tok)


def _gemma3_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    text = _text(s, vocab, tok, sliding_window=16, query_pre_attn_scalar=s.head_dim)
    text["layer_types"] = ["sliding_attention", "full_attention"] * (s.n_layers // 2) + ["full_attention"] * (
        s.n_layers % 2
    )
    return dict(
        text_config={"model_type": "gemma3_text", **text},
        vision_config={"model_type": "siglip_vision_model", **_vision(s)},
        mm_tokens_per_image=4,
        image_token_id=tok.image_token_id,
        boi_token_id=tok.boi_token_id,
        eoi_token_id=tok.eoi_token_id,
        tie_word_embeddings=False,
    )


def _gemma3_processor(s: Sizes, tok: Any) -> dict[str, Any]:
    image_processor = _ip("Gemma3ImageProcessorPil", size={"height": s.image_size, "width": s.image_size})
    return dict(image_processor=image_processor, tokenizer=tok, image_seq_length=4)


def _internvl_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    vision = _vision(s)
    vision.update(image_size=[s.image_size, s.image_size], patch_size=[s.patch, s.patch])
    return dict(
        text_config={"model_type": "qwen2", **_text(s, vocab, tok)},
        vision_config=vision,
        image_token_id=tok.context_image_token_id,
        image_seq_length=(s.image_size // s.patch) ** 2 // 4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )


def _internvl_processor(s: Sizes, tok: Any) -> dict[str, Any]:
    image_processor = _ip(
        "GotOcr2ImageProcessorPil",
        size={"height": s.image_size, "width": s.image_size},
        crop_to_patches=False,
    )
    return dict(image_processor=image_processor, tokenizer=tok, image_seq_length=(s.image_size // s.patch) ** 2 // 4)


def _mllama_config(s: Sizes, vocab: int, tok: Any) -> dict[str, Any]:
    text = _text(s, vocab, tok, cross_attention_layers=[1, 3][: max(1, s.n_layers // 2)])
    text.pop("head_dim")
    vision = dict(
        hidden_size=s.vision_d,
        intermediate_size=s.vision_mlp,
        num_hidden_layers=s.vision_layers,
        num_global_layers=1,
        attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch,
        max_num_tiles=2,
        intermediate_layers_indices=[0],
        vision_output_dim=2 * s.vision_d,
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )
    return dict(text_config=text, vision_config=vision, image_token_id=tok.image_token_id)


def _mllama_processor(s: Sizes, tok: Any) -> dict[str, Any]:
    image_processor = _ip(
        "MllamaImageProcessorPil", size={"height": s.image_size, "width": s.image_size}, max_image_tiles=2
    )
    return dict(image_processor=image_processor, tokenizer=tok)


RECIPES: dict[str, Recipe] = {
    r.family: r
    for r in [
        Recipe(
            family=family,
            model_cls=f"{prefix}ForConditionalGeneration",
            config_cls=f"{prefix}Config",
            processor_cls=f"{prefix}Processor",
            special_tokens=QWEN_SPECIALS,
            extra_special=CHATML_TOKENS,
            chat_template=CHATML_QWEN,
            config=_qwen_config(version),
            processor=_qwen_processor,
            image_hw=lambda s: (2 * s.patch * 2, 2 * s.patch * 3),
        )
        for family, prefix, version in [
            ("qwen2_vl", "Qwen2VL", "2"),
            ("qwen2_5_vl", "Qwen2_5_VL", "2.5"),
            ("qwen3_vl", "Qwen3VL", "3"),
        ]
    ]
    + [
        Recipe(
            family="llava",
            model_cls="LlavaForConditionalGeneration",
            config_cls="LlavaConfig",
            processor_cls="LlavaProcessor",
            special_tokens={"image_token": "<image>"},
            chat_template=LLAVA_TEMPLATE,
            config=_llava_config,
            processor=lambda s, tok: dict(
                image_processor=_clip_processor(s),
                tokenizer=tok,
                patch_size=s.patch,
                vision_feature_select_strategy="default",
                num_additional_image_tokens=1,
            ),
        ),
        Recipe(
            family="llava_next",
            model_cls="LlavaNextForConditionalGeneration",
            config_cls="LlavaNextConfig",
            processor_cls="LlavaNextProcessor",
            special_tokens={"image_token": "<image>"},
            chat_template=LLAVA_TEMPLATE,
            config=_llava_next_config,
            processor=lambda s, tok: dict(
                image_processor=_clip_processor(s, "LlavaNextImageProcessorPil", image_grid_pinpoints=_pinpoints(s)),
                tokenizer=tok,
                patch_size=s.patch,
                vision_feature_select_strategy="default",
                num_additional_image_tokens=1,
            ),
            image_hw=lambda s: (s.image_size, 2 * s.image_size),
        ),
        Recipe(
            family="llava_onevision",
            model_cls="LlavaOnevisionForConditionalGeneration",
            config_cls="LlavaOnevisionConfig",
            processor_cls="LlavaOnevisionProcessor",
            special_tokens={"image_token": "<image>", "video_token": "<video>"},
            extra_special=CHATML_TOKENS,
            chat_template=CHATML_IMAGE,
            config=_onevision_config,
            processor=lambda s, tok: dict(
                image_processor=_ip(
                    "LlavaOnevisionImageProcessorPil",
                    size={"height": s.image_size, "width": s.image_size},
                    image_grid_pinpoints=_pinpoints(s),
                ),
                tokenizer=tok,
                num_image_tokens=(s.image_size // s.patch) ** 2,
                vision_feature_select_strategy="full",
            ),
            image_hw=lambda s: (s.image_size, 2 * s.image_size),
        ),
        Recipe(
            family="idefics3",
            model_cls="Idefics3ForConditionalGeneration",
            config_cls="Idefics3Config",
            processor_cls="Idefics3Processor",
            special_tokens={"image_token": "<image>"},
            extra_special=IDEFICS_EXTRA,
            chat_template=IDEFICS_TEMPLATE,
            config=_idefics_config,
            processor=_idefics_processor("Idefics3ImageProcessorPil"),
            image_hw=lambda s: (s.image_size, 2 * s.image_size),
        ),
        Recipe(
            family="smolvlm",
            model_cls="SmolVLMForConditionalGeneration",
            config_cls="SmolVLMConfig",
            processor_cls="SmolVLMProcessor",
            special_tokens={
                "image_token": "<image>",
                "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>",
                "end_of_utterance_token": "<end_of_utterance>",
                "video_token": "<video>",
            },
            extra_special=IDEFICS_EXTRA,
            chat_template=IDEFICS_TEMPLATE,
            config=_idefics_config,
            processor=_idefics_processor("SmolVLMImageProcessorPil"),
            image_hw=lambda s: (s.image_size, 2 * s.image_size),
        ),
        Recipe(
            family="paligemma",
            model_cls="PaliGemmaForConditionalGeneration",
            config_cls="PaliGemmaConfig",
            processor_cls="PaliGemmaProcessor",
            special_tokens={"image_token": "<image>"},
            chat_template="",
            config=_paligemma_config,
            processor=_paligemma_processor,
            tokenizer_kwargs={"bos_token": "<bos>", "eos_token": "<eos>"},
        ),
        Recipe(
            family="gemma3",
            model_cls="Gemma3ForConditionalGeneration",
            config_cls="Gemma3Config",
            processor_cls="Gemma3Processor",
            special_tokens={
                "image_token": "<image_soft_token>",
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
            },
            extra_special=("<start_of_turn>", "<end_of_turn>"),
            chat_template=GEMMA_TEMPLATE,
            config=_gemma3_config,
            processor=_gemma3_processor,
            tokenizer_kwargs={"bos_token": "<bos>", "eos_token": "<eos>"},
        ),
        Recipe(
            family="internvl",
            model_cls="InternVLForConditionalGeneration",
            config_cls="InternVLConfig",
            processor_cls="InternVLProcessor",
            special_tokens={
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>",
            },
            extra_special=CHATML_TOKENS,
            chat_template=INTERNVL_TEMPLATE.replace("<image>", "<IMG_CONTEXT>"),
            config=_internvl_config,
            processor=_internvl_processor,
        ),
        Recipe(
            family="mllama",
            model_cls="MllamaForConditionalGeneration",
            config_cls="MllamaConfig",
            processor_cls="MllamaProcessor",
            special_tokens={"image_token": "<|image|>"},
            extra_special=(
                "<|python_tag|>",
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ),
            chat_template=MLLAMA_TEMPLATE,
            config=_mllama_config,
            processor=_mllama_processor,
            tokenizer_kwargs={"bos_token": "<|begin_of_text|>"},
        ),
    ]
}

FAMILIES: tuple[str, ...] = tuple(RECIPES)


# ----------------------------------------------------------------------------- building


@dataclass
class TinyVLM:
    """A tiny model, its processor and how it was made."""

    family: str
    model: PreTrainedModel
    processor: ProcessorMixin
    sizes: Sizes
    seed: int

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def image(self, seed: int = 0, size: tuple[int, int] | None = None) -> Image.Image:
        """A random RGB image of a size this family's processor handles (height, width)."""
        height, width = size or RECIPES[self.family].image_hw(self.sizes)
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
        return Image.fromarray(pixels.numpy(), mode="RGB")

    def save(self, path: str | os.PathLike) -> Path:
        """Write an HF checkpoint directory (safetensors, config, processor, tokenizer)."""
        path = Path(path)
        self.model.save_pretrained(path)
        save_processor(self.processor, path)
        return path


def _fix_zero_init(family: str, model: PreTrainedModel, generator: torch.Generator) -> None:
    """Re-initialise parameters that random HF models start at zero, so the image matters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            zero_trap = (
                name.endswith("mm_input_projection_weight")  # gemma3
                or "cross_attn_attn_gate" in name  # mllama
                or "cross_attn_mlp_gate" in name
                or name.endswith("gate")  # mllama vision tower gates
                or name.endswith("cls_token")  # internvl
                or name.endswith("position_embeddings")
                or name.endswith("image_newline")  # llava-next / onevision
            )
            if zero_trap and param.dtype.is_floating_point:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


def _merged(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``updates`` applied, nested dicts (``text_config``, ...) merged key by key."""
    out = dict(base)
    for key, value in updates.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_vlm(
    family: str = "qwen2_5_vl",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    config_updates: dict[str, Any] | None = None,
    **sizes: Any,
) -> TinyVLM:
    """Build a random tiny model of ``family`` with a real processor, offline.

    Args:
        family: one of :data:`FAMILIES`.
        seed: weights are a deterministic function of the seed and the sizes.
        dtype: parameter dtype.
        device: build the parameters directly there, in ``dtype`` (a model at real dimensions
            on a GPU: no float32 copy in host memory); default: built on the CPU in float32,
            then cast.
        config_updates: values merged into the config the recipe writes (nested dicts such as
            ``text_config`` key by key), e.g. a published checkpoint's ``vocab_size`` or
            ``rope_parameters``.
        **sizes: overrides of :class:`Sizes` (``d_model``, ``n_layers``, ``image_size``, ...).

    Returns:
        A :class:`TinyVLM` in eval mode.
    """
    if family not in RECIPES:
        raise UnknownFamilyError(f"No tiny-model recipe for family {family!r}; known: {', '.join(FAMILIES)}.")
    recipe = RECIPES[family]
    size = Sizes(**sizes)
    tok = word_level_tokenizer(
        special_tokens=recipe.special_tokens, extra_special=recipe.extra_special, **recipe.tokenizer_kwargs
    )
    parts = recipe.processor(size, tok)
    processor = build_processor(
        getattr(transformers, recipe.processor_cls), chat_template=recipe.chat_template or None, **parts
    )
    tok = processor.tokenizer  # some processors add tokens to it
    vocab = len(tok)
    values = _merged(recipe.config(size, vocab, tok), config_updates or {})
    config = getattr(transformers, recipe.config_cls)(**values)
    config._attn_implementation = "sdpa"
    generator = torch.Generator().manual_seed(seed)
    with _seeded(seed), _building(device, dtype):
        model = getattr(transformers, recipe.model_cls)(config)
    _fix_zero_init(family, model, generator)
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return TinyVLM(family=family, model=model, processor=processor, sizes=size, seed=seed)


class _building:
    """Inside the block new parameters are created on ``device`` in ``dtype`` (nothing changes
    when ``device`` is None); the default dtype is restored on exit."""

    def __init__(self, device: str | torch.device | None, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    def __enter__(self) -> None:
        if self.device is not None:
            self.default = torch.get_default_dtype()
            self.context = torch.device(self.device)
            self.context.__enter__()
            torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        if self.device is not None:
            torch.set_default_dtype(self.default)
            self.context.__exit__(*exc)


class _seeded:
    """Seed torch's global generator for one block and restore its state after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.random.set_rng_state(self.state)
