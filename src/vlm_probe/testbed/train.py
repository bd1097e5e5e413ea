"""Supervised training (Base and IN stages) and greedy scoring with the harness's grader.

:func:`sft` trains on a stream of (item, response) examples with the loss on the response and
stop tokens only (the prompt is context). :func:`evaluate` answers items greedily with the
shared-prefix decoder and judges each response with :func:`vlm_probe.evaluation.grade`, the
one grader of the project (the response is decoded exactly as the harness decodes a
generation, so the testbed's verdict on an item equals the harness's verdict on the same text).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..evaluation.grading import grade
from .decoding import complete, decode_responses
from .encoding import Encoded, Encoder
from .tasks import Item
from .traces import MAX_NEW_TOKENS

#: One supervised example: an item and the response to teach (its correct response, or a demonstration).
Example = tuple[Item, str]


def examples(items: Iterable[Item]) -> Iterator[Example]:
    """Items paired with their correct responses."""
    return ((item, item.response) for item in items)


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``floor`` of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def target_loss(model: Any, encoded: Encoded) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the target tokens of one sub-batch, and their number."""
    inputs = encoded.inputs
    logits = model(**inputs).logits  # [batch, seq, vocab]
    mask = encoded.target_mask()[:, 1:]
    predicted = logits[:, :-1][mask].float()
    wanted = inputs["input_ids"][:, 1:][mask]
    return F.cross_entropy(predicted, wanted, reduction="sum"), int(mask.sum())


def sft(
    model: Any,
    encoder: Encoder,
    stream: Iterator[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int = 0,
    weight_decay: float = 0.0,
    clip: float = 1.0,
    desc: str = "sft",
    quiet: bool = False,
) -> list[float]:
    """Train ``model`` in place on ``steps`` batches of (item, response) from ``stream``; returns
    the loss per step.

    The loss is the mean cross-entropy of the response and stop tokens; AdamW with linear
    warm-up and cosine decay; gradients clipped to norm ``clip``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for _ in bar:
        batch = [next(stream) for _ in range(batch_size)]
        parts = encoder([item for item, _ in batch], targets=[response for _, response in batch])
        total = sum(int(p.n_target.sum()) for p in parts)
        step_loss = 0.0
        for part in parts:
            loss_sum, _ = target_loss(model, part)
            (loss_sum / total).backward()
            step_loss += float(loss_sum.detach()) / total
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return losses


@dataclass(frozen=True)
class Scored:
    """Greedy responses to items and the harness grader's verdict on each."""

    items: list[Item]
    responses: list[str]
    verdicts: list[bool]

    @property
    def correct(self) -> np.ndarray:
        return np.array(self.verdicts, dtype=float)

    def accuracy(self, by: str = "family") -> dict[str, float]:
        """Mean accuracy per ``family`` or ``task``."""
        out: dict[str, list[float]] = {}
        for item, ok in zip(self.items, self.correct):
            out.setdefault(getattr(item, by), []).append(ok)
        return {k: float(np.mean(v)) for k, v in out.items()}


@torch.no_grad()
def evaluate(
    model: Any,
    encoder: Encoder,
    items: Sequence[Item],
    *,
    batch_size: int = 128,
    max_new_tokens: int = MAX_NEW_TOKENS,
    quiet: bool = True,
) -> Scored:
    """Greedy responses (up to the stop token) for ``items``, in order, graded by
    :func:`vlm_probe.evaluation.grade` against each item's answer."""
    was_training = model.training
    model.eval()
    responses: dict[str, str] = {}
    chunks = range(0, len(items), batch_size)
    for start in tqdm(chunks, desc="evaluate", disable=quiet, leave=False):
        parts = encoder(list(items[start : start + batch_size]))
        tokens = complete(model, encoder, parts, max_new_tokens=max_new_tokens)  # one decode loop for all parts
        ordered = [item for part in parts for item in part.items]
        for item, generation in zip(ordered, decode_responses(encoder, tokens)):
            responses[item.id] = generation.text
    model.train(was_training)
    texts = [responses[item.id] for item in items]
    return Scored(list(items), texts, [grade(text, item.answer).correct for text, item in zip(texts, items)])
