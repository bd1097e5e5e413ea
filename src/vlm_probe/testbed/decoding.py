"""Short completions with a shared prompt prefix: greedy answers, sampled groups, log-probs.

The prompt of each row is run once (:func:`prefill`), its KV cache is repeated for a group
of completions (:meth:`Prefix.expand`), and the completion tokens run on top of it
(:func:`extend`). Prompts encoded in several sub-batches (with and without images) are
prefilled apart and then joined into one left-padded prefix (:meth:`Prefix.concat`), so the
completions of a whole batch decode in one loop. Positions continue from the explicit prompt
positions, so the same code serves 1-D RoPE families and Qwen-VL's 3-D positions. Gradients
flow through the whole thing when enabled (:func:`completion_logits` scores sampled tokens for
:mod:`vlm_probe.testbed.rl`).

Sampling takes a ``torch.Generator`` (no global random state) and never emits the image
placeholder or padding tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..analyses.generation import Generation, decode_rows
from .encoding import Encoded, Encoder


@lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def _cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    params = _forward_params(type(model))
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache, "use_cache": True}


def _output_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


@dataclass
class Prefix:
    """A processed prompt batch: next-token logits, KV cache, mask and the next position."""

    logits: Float[Tensor, "batch vocab"]
    cache: Any
    attention_mask: Int[Tensor, "batch seq"]
    next_position: Int[Tensor, "*axes batch"]  #: ``[batch]`` or ``[3, batch]`` (multimodal RoPE)

    def expand(self, n: int) -> Prefix:
        """Each row repeated ``n`` times in order (``[a, a, b, b]``), cache included (differentiable)."""
        if n == 1:
            return self
        self.cache.batch_repeat_interleave(n)
        return Prefix(
            self.logits.repeat_interleave(n, dim=0),
            self.cache,
            self.attention_mask.repeat_interleave(n, dim=0),
            self.next_position.repeat_interleave(n, dim=-1),
        )


    @staticmethod
    def concat(prefixes: Sequence[Prefix]) -> Prefix:
        """Rows of several prefixes in order, shorter prompts left-padded (masked) to the longest.

        Needs plain (non-sliding) KV caches; raises ``NotImplementedError`` otherwise.
        """
        if len(prefixes) == 1:
            return prefixes[0]
        from transformers.cache_utils import DynamicLayer

        width = max(p.attention_mask.shape[1] for p in prefixes)
        layers = [p.cache.layers for p in prefixes]
        if any(type(layer) is not DynamicLayer for group in layers for layer in group):
            raise NotImplementedError("Joining prefixes needs plain dynamic KV caches (no sliding windows).")
        cache = prefixes[0].cache
        for index, layer in enumerate(cache.layers):
            parts = [group[index] for group in layers]
            layer.keys = torch.cat([F.pad(part.keys, (0, 0, width - part.keys.shape[-2], 0)) for part in parts])
            layer.values = torch.cat([F.pad(part.values, (0, 0, width - part.values.shape[-2], 0)) for part in parts])
        masks = [F.pad(p.attention_mask, (width - p.attention_mask.shape[1], 0)) for p in prefixes]
        return Prefix(torch.cat([p.logits for p in prefixes]), cache, torch.cat(masks),
                      torch.cat([p.next_position for p in prefixes], dim=-1))


def prefill(model: Any, encoded: Encoded) -> Prefix:
    """Run the prompts once; keep the cache and the logits of the last position."""
    inputs = encoded.inputs
    kwargs: dict[str, Any] = dict(inputs)
    kwargs.update(_cache_kwargs(model, None))
    if "logits_to_keep" in _forward_params(type(model)):
        kwargs["logits_to_keep"] = 1
    output = model(**kwargs)
    positions = inputs["position_ids"]
    return Prefix(output.logits[:, -1].float(), _output_cache(output), inputs["attention_mask"],
                  positions[..., -1] + 1)


def prompt_prefix(model: Any, parts: Encoded | Sequence[Encoded], n: int = 1) -> Prefix:
    """The prompts of one or several encoded sub-batches, each row repeated ``n`` times, as one prefix
    (rows in order of the parts; sub-batches are decoded apart when their caches cannot be joined)."""
    parts = [parts] if isinstance(parts, Encoded) else list(parts)
    return Prefix.concat([prefill(model, part).expand(n) for part in parts])


def extend(model: Any, prefix: Prefix, tokens: Int[Tensor, "batch steps"]) -> tuple[Tensor, Prefix]:
    """Feed ``tokens`` after the prefix; returns their logits ``[batch, steps, vocab]`` and the new prefix."""
    steps = tokens.shape[1]
    offsets = torch.arange(steps)
    positions = prefix.next_position.unsqueeze(-1) + offsets  # [..., batch, steps]
    mask = torch.cat([prefix.attention_mask, torch.ones_like(tokens, dtype=prefix.attention_mask.dtype)], dim=1)
    output = model(input_ids=tokens, attention_mask=mask, position_ids=positions, **_cache_kwargs(model, prefix.cache))
    logits = output.logits.float()
    return logits, Prefix(logits[:, -1], _output_cache(output), mask, prefix.next_position + steps)


def _choose(
    logits: Float[Tensor, "batch vocab"],
    suppressed: list[int],
    *,
    sample: bool,
    temperature: float,
    generator: torch.Generator | None,
) -> Int[Tensor, " batch"]:
    logits = logits.detach().clone()
    if suppressed:
        logits[:, suppressed] = float("-inf")
    if not sample:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def rollout(
    model: Any,
    encoder: Encoder,
    encoded: Encoded | Sequence[Encoded],
    *,
    max_new_tokens: int = 3,
    n: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[Int[Tensor, "rows steps"], Float[Tensor, "rows steps vocab"]]:
    """Generate up to ``max_new_tokens`` per row (``n`` per prompt, rows ``[a, a, b, b]``, parts in order)
    with their logits.

    Greedy unless ``sample``; stops once every row has produced an end token (the stop token or
    EOS), and tokens after a row's end are the stop token. The logits that chose each token are returned
    (with gradients when grad is enabled), so one pass both samples and scores a rollout.
    """
    prefix = prompt_prefix(model, encoded, n)
    stop = encoder.stop_id
    ends = torch.tensor(sorted(encoder.end_ids))
    chosen: list[Tensor] = []
    scores: list[Tensor] = []
    done = torch.zeros(prefix.logits.shape[0], dtype=torch.bool)
    logits = prefix.logits
    for step in range(max_new_tokens):
        token = _choose(logits, encoder.suppressed, sample=sample, temperature=temperature, generator=generator)
        token = torch.where(done, torch.full_like(token, stop), token)
        chosen.append(token)
        scores.append(logits)
        done |= torch.isin(token, ends)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        step_logits, prefix = extend(model, prefix, token.unsqueeze(1))
        logits = step_logits[:, -1]
    return torch.stack(chosen, dim=1), torch.stack(scores, dim=1)


@torch.no_grad()
def complete(
    model: Any,
    encoder: Encoder,
    encoded: Encoded | Sequence[Encoded],
    *,
    max_new_tokens: int = 3,
    n: int = 1,
    sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> Int[Tensor, "rows steps"]:
    """Tokens of :func:`rollout` without gradients (greedy answers, or samples)."""
    tokens, _ = rollout(model, encoder, encoded, max_new_tokens=max_new_tokens, n=n, sample=sample,
                        temperature=temperature, generator=generator)
    return tokens


def completion_logits(
    model: Any, encoded: Encoded | Sequence[Encoded], completions: Int[Tensor, "rows steps"], n: int
) -> Float[Tensor, "rows steps vocab"]:
    """Logits that predicted each completion token (teacher forcing over a shared prefix).

    ``completions`` holds ``n`` rows per prompt of ``encoded`` (``[a, a, b, b]``, parts in order).
    Runs with gradients when called with grad enabled.
    """
    prefix = prompt_prefix(model, encoded, n)
    first = prefix.logits.unsqueeze(1)
    if completions.shape[1] == 1:
        return first
    rest, _ = extend(model, prefix, completions[:, :-1])
    return torch.cat([first, rest], dim=1)


def decode_responses(encoder: Encoder, tokens: Int[Tensor, "rows steps"]) -> list[Generation]:
    """Each completion cut at its stop token and decoded exactly as the evaluation harness decodes
    a generation (:func:`vlm_probe.analyses.generation.decode_rows`), so one grader judges both;
    ``finished`` tells whether the stop token came within the completion."""
    return decode_rows(encoder.tokenizer, tokens.tolist(), encoder.end_ids)
