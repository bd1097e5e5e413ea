"""Greedy generation with an explicit, recorded configuration (plain and traced).

Checkpoints ship their own ``generation_config.json`` (sampling temperatures, top-p,
repetition penalties) that ``generate`` would silently apply. :func:`greedy_config` builds a
complete config that overrides them: greedy decoding, one beam, no repetition penalty, the
model's pad/eos ids, and the image (and video) placeholder tokens suppressed: a generated
placeholder makes the next forward fail with "Image features and image tokens do not match".

Passing a config to ``generate`` is not enough on its own: transformers fills every field the
passed config leaves unset (``None``) from the checkpoint's ``generation_config`` (a
checkpoint's ``num_return_sequences`` or ``no_repeat_ngram_size`` would leak in). Every
generation here runs inside :func:`generation_defaults`, which sets the checkpoint's config
aside for the call and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import GenerationConfig

from ..errors import InputError
from ..model.inputs import Batch

#: Anything that turns a prepared batch into one generated text (or :class:`Generation`) per row.
Generator = Callable[[Batch], Sequence["str | Generation"]]


@dataclass(frozen=True)
class Generation:
    """One generated continuation: its text, its length in tokens, and whether it ended (eos)."""

    text: str
    n_tokens: int | None = None
    finished: bool | None = None


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def placeholder_token_ids(vlm: Any) -> list[int]:
    """Token ids generation must never emit: the image placeholder, and the video one if any."""
    config = vlm.hf.config
    ids = [int(vlm.image_token_id)]
    for name in ("video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    return ids


def greedy_config(vlm: Any, max_new_tokens: int = 64, **overrides: Any) -> GenerationConfig:
    """A complete greedy :class:`~transformers.GenerationConfig` for ``vlm``.

    ``do_sample=False, num_beams=1, repetition_penalty=1.0``, sampling knobs unset, pad id
    from the tokenizer, eos ids from the checkpoint's generation config and the tokenizer, and
    ``suppress_tokens`` = the image/video placeholder ids. ``overrides`` change any field.
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    tokenizer = vlm.tokenizer
    checkpoint = getattr(vlm.hf, "generation_config", None)
    eos = _ids(getattr(checkpoint, "eos_token_id", None))
    for extra in _ids(tokenizer.eos_token_id):
        if extra not in eos:
            eos.append(extra)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
    fields: dict[str, Any] = dict(
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        temperature=None,
        top_p=None,
        top_k=None,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad,
        eos_token_id=eos or None,
        bos_token_id=getattr(checkpoint, "bos_token_id", None),
        suppress_tokens=placeholder_token_ids(vlm),
        use_cache=True,
    )
    fields.update(overrides)
    return GenerationConfig(**fields)


@contextlib.contextmanager
def generation_defaults(model: Any, config: GenerationConfig) -> Iterator[None]:
    """Within the block, ``model.generation_config`` is a copy of ``config``; restored on exit.

    Use it around ``model.generate(..., generation_config=config)`` (or a traced
    ``vlm.generate``) so that no field of the checkpoint's own generation config fills in a
    field ``config`` leaves unset.
    """
    saved = model.generation_config
    model.generation_config = copy.deepcopy(config)
    try:
        yield
    finally:
        model.generation_config = saved


def config_record(config: GenerationConfig) -> dict[str, Any]:
    """The fields of a generation config that decide the output, for run metadata."""
    keys = ("do_sample", "num_beams", "repetition_penalty", "temperature", "top_p", "top_k", "max_new_tokens",
            "pad_token_id", "eos_token_id", "bos_token_id", "suppress_tokens", "bad_words_ids", "length_penalty",
            "no_repeat_ngram_size", "min_new_tokens")
    return {k: getattr(config, k, None) for k in keys}


def eos_ids(vlm: Any, config: GenerationConfig | None = None) -> set[int]:
    """The end-of-sequence ids: the config's, else the checkpoint's, else the tokenizer's."""
    for source in (config, vlm.hf.generation_config):
        ids = _ids(getattr(source, "eos_token_id", None)) if source is not None else []
        if ids:
            return set(ids)
    return set(_ids(vlm.tokenizer.eos_token_id))


def fixed_steps(config: GenerationConfig) -> GenerationConfig:
    """The same decoding without early stopping, for traces that intervene at every step.

    A trace looping over ``tracer.iter[0:n]`` needs all ``n`` steps to happen; answers are cut
    at the first end-of-sequence token by :func:`decode_new`, so they equal early-stopped ones.
    """
    steps = copy.deepcopy(config)
    steps.eos_token_id = None
    return steps


def decode_rows(tokenizer: Any, rows: Sequence[Sequence[int]], eos: set[int]) -> list[Generation]:
    """Each row of generated token ids cut at its first end-of-sequence token and decoded
    (special tokens skipped, whitespace collapsed): the text every grader in vlm_probe sees."""
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in eos), None)
        kept = list(row) if end is None else list(row[:end])
        text = tokenizer.decode(kept, skip_special_tokens=True)
        out.append(Generation(re.sub(r"\s+", " ", text).strip(), len(kept), end is not None))
    return out


def split_new(vlm: Any, ids: Tensor, prompt_width: int, eos: set[int]) -> list[Generation]:
    """The generated part of each row, cut at its first end-of-sequence token."""
    return decode_rows(vlm.tokenizer, ids[:, prompt_width:].tolist(), eos)


def decode_new(vlm: Any, ids: Tensor, prompt_width: int, eos: set[int] | None = None) -> list[str]:
    """Decoded texts of the generated part of each row, up to its first end-of-sequence token."""
    return [g.text for g in split_new(vlm, ids, prompt_width, eos_ids(vlm) if eos is None else eos)]


class GreedyGenerator:
    """``vlm.hf.generate`` with an explicit greedy config; decodes only the new tokens.

    Call it on a :class:`~vlm_probe.model.inputs.Batch` prepared by the same ``vlm`` (left
    padded); returns one :class:`Generation` per row.
    """

    def __init__(self, vlm: Any, max_new_tokens: int = 64, config: GenerationConfig | None = None) -> None:
        self.vlm = vlm
        self.config = config if config is not None else greedy_config(vlm, max_new_tokens)

    @property
    def settings(self) -> dict[str, Any]:
        return {"generator": "greedy", "generation_config": config_record(self.config)}

    def __call__(self, batch: Batch) -> list[Generation]:
        hf = self.vlm.hf
        device = next(hf.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
        inputs.pop("position_ids", None)  # generate derives positions from the attention mask
        with torch.inference_mode(), generation_defaults(hf, self.config):
            out = hf.generate(**inputs, generation_config=self.config)
        return split_new(self.vlm, out.cpu(), batch.width, set(_ids(self.config.eos_token_id)))


def generate_texts(vlm: Any, batch: Batch, config: GenerationConfig) -> list[str]:
    """Plain greedy generation (no intervention) of every row of ``batch``."""
    return [g.text for g in GreedyGenerator(vlm, config=config)(batch)]


#: ``grader(prediction, gold) -> bool``, or one ``grader(prediction) -> bool`` per sample
Grader = Callable[[str, Any], bool] | Sequence[Callable[[str], bool]]


def apply_grader(grader: Grader, sample: int, prediction: str, gold: Any) -> bool:
    """Grade one prediction with a shared grader (given the gold answer) or a per-sample one."""
    if callable(grader):
        return bool(gold is not None and grader(prediction, gold))
    return bool(grader[sample](prediction))


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation at the ends and collapse spaces (exact-match grading)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,:;!?\"'")


def exact_match(prediction: str, gold: str) -> bool:
    """Normalized exact match, also accepting a prediction whose first word is the gold answer."""
    p, g = normalize_answer(prediction), normalize_answer(gold)
    return p == g or (bool(p) and p.split(" ")[0].strip(".,:;!?") == g)
