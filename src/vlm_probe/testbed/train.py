"""Supervised training (Base and IN stages) and greedy scoring with the harness's grader.

:func:`sft` trains on a stream of (item, response) examples with the loss on the response and
stop tokens only (the prompt is context). :func:`evaluate` answers items greedily with the
shared-prefix decoder and judges each response with :func:`vlm_probe.evaluation.grade`, the
one grader of the project (the response is decoded exactly as the harness decodes a
generation, so the testbed's verdict on an item equals the harness's verdict on the same text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
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


#: ``reduce(gradients, totals)``: sum, in place, every process's gradient tensors and its
#: ``[summed loss, target tokens]`` (float64) over the processes sharing a batch.
Reduce = Callable[[list[torch.Tensor], torch.Tensor], None]


def shard_bounds(batch_size: int, shards: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of ``shards`` contiguous, near-equal shards of a batch."""
    edges = [round(k * batch_size / shards) for k in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def shard_gradient(model: Any, encoder: Encoder, batch: Sequence[Example],
                   params: list[torch.nn.Parameter]) -> tuple[list[torch.Tensor], float, int]:
    """The summed (not averaged) loss gradient of one shard, its summed loss and target-token count;
    leaves ``.grad`` empty. Parameters the shard does not reach get zeros."""
    loss_sum, tokens = 0.0, 0
    for part in encoder([item for item, _ in batch], targets=[response for _, response in batch]):
        loss, n = target_loss(model, part)
        loss.backward()
        loss_sum, tokens = loss_sum + float(loss.detach()), tokens + n
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    return grads, loss_sum, tokens


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
    shards: int = 1,
    rank: int = 0,
    world: int = 1,
    reduce: Reduce | None = None,
    desc: str = "sft",
    quiet: bool = False,
) -> list[float]:
    """Train ``model`` in place on ``steps`` batches of (item, response) from ``stream``; returns
    the loss per step.

    The loss is the mean cross-entropy of the response and stop tokens over the batch; AdamW
    with linear warm-up and cosine decay; gradients clipped to norm ``clip``.

    Data parallel: each batch splits into ``shards`` fixed shards, each encoded and
    back-propagated on its own; their summed gradients are added, then divided by the batch's
    target tokens. Process ``rank`` of ``world`` computes shards ``rank, rank + world, ...`` of
    every batch (all processes draw the same stream) and ``reduce`` sums gradients and totals
    over the processes (:mod:`vlm_probe.testbed.data_parallel`). With 2 shards, one process and
    two give bit-identical weights (``a + b == b + a``); with more shards the order of the sums,
    and so the last bits, depend on ``world``.
    """
    if world > 1 and reduce is None:
        raise ValueError("world > 1 needs reduce (the sum over processes).")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    bounds = shard_bounds(batch_size, shards)[rank::world]
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
    for _ in bar:
        batch = [next(stream) for _ in range(batch_size)]
        grads: list[torch.Tensor] | None = None
        totals = torch.zeros(2, dtype=torch.float64)  # summed loss, target tokens
        for start, stop in bounds:
            shard, loss_sum, tokens = shard_gradient(model, encoder, batch[start:stop], params)
            grads = shard if grads is None else [g.add_(h) for g, h in zip(grads, shard)]
            totals += torch.tensor([loss_sum, tokens], dtype=torch.float64)
        assert grads is not None
        if reduce is not None:
            reduce(grads, totals)
        for p, g in zip(params, grads):
            p.grad = g.div_(float(totals[1]))
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(totals[0] / totals[1]))
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
