"""RL with a verifiable reward: Dr. GRPO on sampled reasoning traces, KL to IN optional.

Each step draws ``prompts`` items from the prompt pool and samples ``group`` responses per
prompt from the policy, without gradients, over a shared prompt prefix
(:func:`vlm_probe.testbed.decoding.complete`: the prompt's KV cache is computed once and
repeated for the group). A response earns ``1`` when the evaluation harness's grader
(:func:`vlm_probe.evaluation.grade`) accepts its answer and it ended with the stop token, plus
``format_reward`` when it ended and states "the answer is ...".

The estimator is **Dr. GRPO** (Liu et al., 2025, "Understanding R1-Zero-Like Training"): the
advantage of a response is its reward minus its group's mean reward (no division by the group's
standard deviation, which over-weights groups that almost agree), and the loss sums
``-advantage x log p(token)`` over the sampled tokens and divides by a constant (rows x
``max_new_tokens``) rather than by each response's length, which would favour long wrong answers.
One update per batch keeps it on-policy, so the importance ratio is 1 and needs no clipping.
With ``kl > 0`` the loss adds ``kl`` times the exact per-token KL(policy || reference) over the
vocabulary, the reference (IN) frozen. The log-probabilities with gradients come from one
teacher-forced pass over the sampled tokens on top of the shared prefix
(:func:`~vlm_probe.testbed.decoding.completion_logits`).

Parameters named by a freezing spec (:mod:`vlm_probe.testbed.freezing`) get no gradient and
are not given to the optimizer, so they stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..analyses.generation import Generation
from ..evaluation.grading import grade
from .decoding import complete, completion_logits, decode_responses
from .encoding import Encoded, Encoder
from .freezing import frozen
from .train import lr_factor
from .tasks import Item

#: The RL estimator this module implements (recorded in build logs).
ESTIMATOR = "dr_grpo"


def group_advantages(rewards: Float[Tensor, " rows"], group: int, *, normalize: bool = False,
                     eps: float = 1e-6) -> Float[Tensor, " rows"]:
    """Reward minus its group's mean, for rows laid out ``[a, a, b, b]`` (Dr. GRPO); with
    ``normalize`` divided by the group's standard deviation as in the original GRPO (0 where a
    group agrees)."""
    r = rewards.view(-1, group)
    centred = r - r.mean(dim=1, keepdim=True)
    if normalize:
        std = r.std(dim=1, keepdim=True, unbiased=False)
        centred = torch.where(std > eps, centred / std.clamp(min=eps), torch.zeros_like(centred))
    return centred.reshape(-1)


def completion_mask(tokens: Int[Tensor, "rows steps"], end_ids: Collection[int]) -> Bool[Tensor, "rows steps"]:
    """Tokens up to and including each row's first end token (stop token or EOS)."""
    is_end = torch.isin(tokens, torch.tensor(sorted(end_ids)))
    before = is_end.long().cumsum(dim=1) - is_end.long()  # end tokens strictly before this position
    return before == 0


def rewards_for(generations: Sequence[Generation], answers: Sequence[str], *,
                format_reward: float = 0.1) -> tuple[Float[Tensor, " rows"], Float[Tensor, " rows"]]:
    """``(reward, correct)`` per response: correct = the grader accepts the answer and the response
    ended; reward = correct + ``format_reward`` for an ended response that states its answer."""
    correct, reward = [], []
    for generation, answer in zip(generations, answers):
        ended = bool(generation.finished)
        ok = ended and grade(generation.text, answer).correct
        stated = ended and "the answer is" in generation.text
        correct.append(float(ok))
        reward.append(float(ok) + format_reward * float(stated))
    return torch.tensor(reward), torch.tensor(correct)


@dataclass
class Sampled:
    """One batch of the RL loop: the prompts' sub-batches, sampled tokens, rewards, advantages, log row."""

    parts: list[Encoded]
    tokens: Int[Tensor, "rows steps"]
    reward: Float[Tensor, " rows"]
    advantages: Float[Tensor, " rows"]
    log: dict[str, float]


def policy_gradient(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    encoder: Encoder,
    items: Sequence[Item],
    *,
    group: int,
    kl: float,
    temperature: float,
    max_new_tokens: int,
    format_reward: float,
    generator: torch.Generator,
) -> Sampled:
    """Sample ``group`` responses per item, reward them, and accumulate the Dr. GRPO gradient
    (plus ``kl`` x KL to the reference) into the policy's ``.grad`` (no optimizer step)."""
    parts = encoder(list(items))
    ordered = [item for part in parts for item in part.items]
    policy.eval()
    with torch.no_grad():  # one decode loop for every sub-batch, prompt caches shared per group
        tokens = complete(policy, encoder, parts, max_new_tokens=max_new_tokens, n=group, sample=True,
                          temperature=temperature, generator=generator)
    answers = [item.answer for item in ordered for _ in range(group)]
    reward, correct = rewards_for(decode_responses(encoder, tokens), answers, format_reward=format_reward)
    advantages = group_advantages(reward, group)
    log: dict[str, float] = {
        "reward": float(reward.mean()), "correct": float(correct.mean()),
        "informative": float((reward.view(-1, group).std(1) > 0).float().mean()), "pg": 0.0,
    }
    by_family: dict[str, list[float]] = {}
    for item, c in zip(ordered, correct.view(-1, group).mean(1).tolist()):
        by_family.setdefault(item.family, []).append(c)
    log.update({f"correct/{family}": float(np.mean(values)) for family, values in by_family.items()})
    policy.train()
    if bool(advantages.abs().gt(0).any()) or kl > 0:
        mask = completion_mask(tokens, encoder.end_ids).float()
        logp = F.log_softmax(completion_logits(policy, parts, tokens, group) / temperature, dim=-1)
        token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        pg = -(advantages.unsqueeze(1) * token_logp * mask).sum()
        loss = pg
        if reference is not None:
            with torch.no_grad():
                ref = F.log_softmax(completion_logits(reference, parts, tokens, group) / temperature, dim=-1)
            kl_sum = ((logp.exp() * (logp - ref)).sum(-1) * mask).sum()
            log["kl"] = float(kl_sum.detach()) / max(1.0, float(mask.sum()))
            loss = loss + kl * kl_sum
        norm = tokens.shape[0] * max_new_tokens  # Dr. GRPO: a constant, not each response's length
        (loss / norm).backward()
        log["pg"] = float(pg.detach()) / norm
    return Sampled(parts, tokens, reward, advantages, log)


def grpo(
    policy: torch.nn.Module,
    reference: torch.nn.Module | None,
    encoder: Encoder,
    stream: Iterator[Item],
    *,
    steps: int,
    prompts: int = 16,
    group: int = 8,
    lr: float = 2e-4,
    kl: float = 0.0,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    format_reward: float = 0.1,
    seed: int = 0,
    frozen_params: Collection[str] = (),
    clip: float = 1.0,
    warmup: int = 10,
    lr_floor: float = 0.1,
    desc: str = "rl",
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Train ``policy`` in place; returns one log row per step.

    The learning rate warms up over ``warmup`` steps and then decays along a cosine to
    ``lr_floor * lr`` (late steps move the policy less, so the end of the run is stable;
    ``warmup=0, lr_floor=1.0`` is a constant rate).

    Log columns: ``reward`` (mean, format bonus included), ``correct`` (mean), ``correct/<family>``,
    ``kl`` (per token, when a reference is given), ``pg`` (the policy-gradient loss) and
    ``informative`` (share of groups whose rewards differ, the only ones that teach anything) and
    ``lr`` (the rate of that step's update).
    """
    if kl > 0 and reference is None:
        raise InputError("kl > 0 needs the reference model (IN).")
    generator = torch.Generator().manual_seed(seed)
    if reference is not None:
        reference.eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    log: list[dict[str, float]] = []
    with frozen(policy, frozen_params) as params:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup, lr_floor))
        bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
        for _ in bar:
            items = [next(stream) for _ in range(prompts)]
            row = policy_gradient(policy, reference, encoder, items, group=group, kl=kl, temperature=temperature,
                                  max_new_tokens=max_new_tokens, format_reward=format_reward, generator=generator).log
            torch.nn.utils.clip_grad_norm_(params, clip)
            row["lr"] = optimizer.param_groups[0]["lr"]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            log.append(row)
            if len(log) % 5 == 0:
                recent = log[-20:]
                bar.set_postfix(correct=f"{np.mean([r['correct'] for r in recent]):.3f}")
    policy.eval()
    return log
