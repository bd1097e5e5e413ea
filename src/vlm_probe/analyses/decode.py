"""Greedy decoding as a loop of traced forwards over a KV cache (the engine's answer readout).

The engine's prefill may be a suffix rerun over a shared cache, with layers replayed from
another run, so it cannot go through ``generate``; it continues here: one traced forward per
generated token, fed the argmax, with the position ids, attention mask and text fields that
``generate`` would pass (checked against ``generate`` on every family). Interventions that act
at every token are applied at each step, in the step's own invokes.

Only greedy decoding is done here: a config asking for sampling, beams or logits processors
other than suppressed tokens is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import GenerationConfig

from ..errors import InputError
from ..model.inputs import Batch, ForwardInputs
from .batched import tile

if TYPE_CHECKING:
    from ..model.wrapper import VLM

#: fields of a GenerationConfig that would change greedy decoding, with their neutral values
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "do_sample": (False, None),
    "num_beams": (1, None),
    "repetition_penalty": (1.0, None),
    "no_repeat_ngram_size": (0, None),
    "bad_words_ids": (None,),
    "min_new_tokens": (0, None),
    "min_length": (0, None),
    "sequence_bias": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "encoder_repetition_penalty": (1.0, None),
    "exponential_decay_length_penalty": (None,),
    "begin_suppress_tokens": (None, []),
    "guidance_scale": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "typical_p": (None, 1.0),
}


def check_greedy(config: GenerationConfig) -> None:
    """Refuse a generation config that is not plain greedy decoding (suppressed tokens allowed)."""
    bad = [f"{name}={getattr(config, name)!r}" for name, neutral in _NEUTRAL.items()
           if hasattr(config, name) and getattr(config, name) not in neutral]
    if not getattr(config, "max_new_tokens", None):
        bad.append("no max_new_tokens")
    if bad:
        raise InputError(
            "Sweeps decode greedily (with suppressed tokens only); this generation config asks for "
            f"{', '.join(bad)}. Use vlm_probe.analyses.generation.greedy_config(vlm, max_new_tokens)."
        )


@dataclass
class DecodeState:
    """What a greedy step needs after a prefill of ``rows`` rows."""

    cache: Any  #: the KV cache holding every prompt column
    attention_mask: Int[Tensor, "rows seq"]  #: the prompt's mask
    last_positions: Tensor  #: ``[..., rows, 1]`` the position ids of the last prompt column
    extra: dict[str, Tensor]  #: per-token text fields the model wants at a decode step (last column)


def prefill_state(vlm: VLM, batch: Batch, k: int, cache: Any, positions: Tensor | None) -> DecodeState:
    """The decode state after a prefill of ``batch`` repeated ``k`` times.

    Args:
        positions: the position ids the language model received (``[..., rows, seq]``), or
            ``None`` where it numbered the columns itself.
    """
    mask = tile(batch.inputs["attention_mask"], k)
    if positions is None:
        last = torch.full((mask.shape[0], 1), batch.width - 1, dtype=torch.long)
    else:
        last = positions[..., -1:]
    extra = {}
    for name in ("cross_attention_mask",):
        if name in batch.inputs:
            extra[name] = tile(batch.inputs[name][:, -1:], k)
    return DecodeState(cache, mask, last, extra)


def suppress(logits: Float[Tensor, "rows vocab"], config: GenerationConfig) -> Float[Tensor, "rows vocab"]:
    ids = list(getattr(config, "suppress_tokens", None) or [])
    if ids:
        logits = logits.clone()
        logits[:, ids] = float("-inf")
    return logits


def greedy(
    vlm: VLM,
    state: DecodeState,
    first: Float[Tensor, "rows vocab"],
    config: GenerationConfig,
    eos: set[int],
    step: Callable[[Any, int, int], None] | None = None,
) -> list[list[int]]:
    """Greedy tokens from the prefill logits ``first``, one traced forward per further token.

    Args:
        step: ``step(tracer, s, column)`` is called inside each step's trace (the ``s``-th
            generated token, at absolute ``column``) to apply the interventions that act at
            every token, in invokes it opens on ``tracer``.

    Returns:
        Per row, ``config.max_new_tokens`` token ids (or fewer when every row ended).
    """
    steps = int(config.max_new_tokens)
    rows = first.shape[0]
    tokens = suppress(first.float(), config).argmax(-1).cpu()
    out = [tokens]
    done = torch.tensor([int(t) in eos for t in tokens])
    width = state.attention_mask.shape[1]
    mask = state.attention_mask
    device = vlm.device
    for s in range(1, steps):
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], dim=1)
        kwargs = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": state.last_positions + s,
                  vlm.cache_argument: state.cache, "use_cache": True, "logits_to_keep": 1, **state.extra}
        kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        with torch.no_grad(), vlm.trace() as tracer:
            with tracer.invoke(ForwardInputs(kwargs, rows=rows)):
                logits = vlm.lm_head.output[:, -1].save()
            if step is not None:
                step(tracer, s, width + s - 1)
        tokens = suppress(logits.float(), config).argmax(-1).cpu()
        out.append(tokens)
        done |= torch.tensor([int(t) in eos for t in tokens])
    return torch.stack(out, dim=1).tolist()
