"""Greedy generation with an explicit, recorded configuration.

Checkpoints ship generation defaults (sampling, repetition penalties) that would make
answer-level probes irreproducible; analyses always pass :func:`greedy_config`, which
overrides them and never lets the image placeholder be generated (the next forward would
fail: image features and image tokens no longer match).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig


def greedy_config(vlm: Any, max_new_tokens: int = 16, **overrides: Any) -> GenerationConfig:
    """Greedy decoding: no sampling, one beam, no repetition penalty, image token suppressed."""
    tokenizer = vlm.tokenizer
    eos = vlm.hf.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    settings: dict[str, Any] = dict(
        do_sample=False,
        num_beams=1,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        suppress_tokens=[vlm.image_token_id],
    )
    settings.update(overrides)
    return GenerationConfig(**settings)


def config_record(config: GenerationConfig) -> dict[str, Any]:
    """The generation settings that matter, for result metadata."""
    keys = ("do_sample", "num_beams", "repetition_penalty", "max_new_tokens", "eos_token_id", "suppress_tokens")
    return {k: getattr(config, k) for k in keys}


def eos_ids(vlm: Any, config: GenerationConfig | None = None) -> set[int]:
    """The end-of-sequence ids: the config's, else the checkpoint's, else the tokenizer's."""
    eos = config.eos_token_id if config is not None and config.eos_token_id is not None else None
    if eos is None:
        eos = vlm.hf.generation_config.eos_token_id
    if eos is None:
        eos = vlm.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def fixed_steps(config: GenerationConfig) -> GenerationConfig:
    """The same decoding without early stopping, for traces that intervene at every step.

    A trace looping over ``tracer.iter[0:n]`` needs all ``n`` steps to happen; answers are cut
    at the first end-of-sequence token by :func:`decode_new`, so they equal early-stopped ones.
    """
    copy = GenerationConfig(**config.to_dict())
    copy.eos_token_id = None
    return copy


def decode_new(vlm: Any, ids: Tensor, prompt_width: int, eos: set[int] | None = None) -> list[str]:
    """Decode the generated part of each row up to its first end-of-sequence token."""
    eos = eos_ids(vlm) if eos is None else eos
    texts = []
    for row in ids[:, prompt_width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(vlm.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return [re.sub(r"\s+", " ", t).strip() for t in texts]


def generate_texts(vlm: Any, batch: Any, config: GenerationConfig) -> list[str]:
    """Plain greedy generation (no intervention) of every row of ``batch``."""
    inputs = {k: v.to(vlm.hf.device) for k, v in batch.inputs.items() if k != "position_ids"}
    with torch.no_grad():
        ids = vlm.hf.generate(**inputs, generation_config=config)
    return decode_new(vlm, ids, batch.width, eos_ids(vlm, config))


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation at the ends and collapse spaces (exact-match grading)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,:;!?\"'")


def exact_match(prediction: str, gold: str) -> bool:
    """Normalized exact match, also accepting a prediction whose first word is the gold answer."""
    p, g = normalize_answer(prediction), normalize_answer(gold)
    return p == g or (bool(p) and p.split(" ")[0].strip(".,:;!?") == g)
