"""Supervised training (Base and IN stages) and a greedy exact-match evaluator.

:func:`sft` trains on an :class:`~vlm_probe.testbed.tasks.ItemStream` with the loss on the
answer and stop tokens only (the prompt is context). :func:`evaluate` answers items greedily
and scores exact matches; it is the testbed's own training-time monitor (the general
evaluation harness lives in :mod:`vlm_probe.evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .decoding import complete, decode_answers
from .encoding import Encoded, Encoder
from .tasks import Item


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
    stream: Iterator[Item],
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
    """Train ``model`` in place on ``steps`` batches from ``stream``; returns the loss per step.

    The loss is the mean cross-entropy of the answer and stop tokens; AdamW with linear
    warm-up and cosine decay; gradients clipped to norm ``clip``.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for _ in bar:
        items = [next(stream) for _ in range(batch_size)]
        parts = encoder(items, targets=True)
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
    """Greedy answers to items and whether each matches exactly."""

    items: list[Item]
    predictions: list[str]

    @property
    def correct(self) -> np.ndarray:
        return np.array([p == item.answer for p, item in zip(self.predictions, self.items)], dtype=float)

    def accuracy(self, by: str = "family") -> dict[str, float]:
        """Mean exact-match accuracy per ``family`` or ``task``."""
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
    max_new_tokens: int = 3,
    quiet: bool = True,
) -> Scored:
    """Greedy answers (up to the stop token) for ``items``, in order, with exact-match scoring."""
    was_training = model.training
    model.eval()
    predictions: dict[str, str] = {}
    chunks = range(0, len(items), batch_size)
    for start in tqdm(chunks, desc="evaluate", disable=quiet, leave=False):
        for part in encoder(list(items[start : start + batch_size])):
            tokens = complete(model, encoder, part, max_new_tokens=max_new_tokens)
            for item, answer in zip(part.items, decode_answers(encoder, tokens)):
                predictions[item.id] = answer
    model.train(was_training)
    return Scored(list(items), [predictions[item.id] for item in items])
