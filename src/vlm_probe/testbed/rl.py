"""Group-relative policy-gradient RL with a verifiable exact-match reward and a KL term to IN.

Each step draws ``prompts`` items, samples ``group`` completions per prompt from the policy
(one pass over a shared prompt prefix that both samples and keeps the logits for the loss,
:func:`vlm_probe.testbed.decoding.rollout`), rewards a completion 1 when its
text up to the stop token equals the item's answer (0 otherwise, a missing stop token
included), and normalises rewards within each group (advantage = (r - mean) / std, 0 when
the whole group agrees). The loss is the advantage-weighted negative log-likelihood of the
sampled tokens (on-policy, one update per batch, so no ratio clipping is needed) plus
``kl`` times the exact per-token KL(policy || reference) over the vocabulary, with the
reference (IN) frozen. Without the KL term a policy this small collapses to one answer
within about a hundred steps (see the field notes).

Parameters named by a freezing spec (:mod:`vlm_probe.testbed.freezing`) get no gradient and
are not given to the optimizer, so they stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .decoding import completion_logits, decode_answers, rollout
from .encoding import Encoder
from .freezing import frozen
from .tasks import Item


def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-6) -> torch.Tensor:
    """``(r - group mean) / group std`` for rewards laid out ``[a, a, b, b]``; 0 where a group agrees."""
    r = rewards.view(-1, group)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, centred / std.clamp(min=eps), torch.zeros_like(centred)).view(-1)


def completion_mask(tokens: torch.Tensor, stop_id: int) -> torch.Tensor:
    """``[rows, steps]`` bool: tokens up to and including each row's first stop token."""
    is_stop = tokens == stop_id
    before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stops strictly before this position
    return before == 0


def grpo(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    encoder: Encoder,
    stream: Iterator[Item],
    *,
    steps: int,
    prompts: int = 16,
    group: int = 8,
    lr: float = 2e-4,
    kl: float = 0.1,
    temperature: float = 1.0,
    max_new_tokens: int = 2,
    seed: int = 0,
    frozen_params: Collection[str] = (),
    clip: float = 1.0,
    desc: str = "rl",
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Train ``policy`` in place; returns one log row per step (reward, KL, loss, per-family reward)."""
    generator = torch.Generator().manual_seed(seed)
    reference.eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    log: list[dict[str, float]] = []
    with frozen(policy, frozen_params) as params:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
        bar = tqdm(range(steps), desc=desc, disable=quiet, leave=False)
        for _ in bar:
            items = [next(stream) for _ in range(prompts)]
            parts = encoder(items)
            policy.train()
            scored = []
            for part in parts:  # one pass with gradients samples the completions and scores them
                tokens, logits = rollout(policy, encoder, part, max_new_tokens=max_new_tokens, n=group,
                                         sample=True, temperature=temperature, generator=generator)
                answers = decode_answers(encoder, tokens)
                wanted = [item.answer for item in part.items for _ in range(group)]
                rewards = torch.tensor([float(a == w) for a, w in zip(answers, wanted)])
                scored.append((part, tokens, logits, rewards))
            n_tokens = sum(int(completion_mask(t, encoder.stop_id).sum()) for _, t, _, _ in scored)
            row: dict[str, float] = {"reward": 0.0, "kl": 0.0, "pg": 0.0}
            for part, tokens, logits, rewards in scored:
                mask = completion_mask(tokens, encoder.stop_id).float()
                advantages = group_advantages(rewards, group)
                logp = F.log_softmax(logits, dim=-1)
                with torch.no_grad():
                    ref_logp = F.log_softmax(completion_logits(reference, part, tokens, group), dim=-1)
                token_logp = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                pg = -(advantages.unsqueeze(1) * token_logp * mask).sum()
                kl_tokens = (logp.exp() * (logp - ref_logp)).sum(-1)
                kl_sum = (kl_tokens * mask).sum()
                ((pg + kl * kl_sum) / n_tokens).backward(retain_graph=False)
                row["pg"] += float(pg.detach()) / n_tokens
                row["kl"] += float(kl_sum.detach()) / n_tokens
                row["reward"] += float(rewards.sum()) / (len(items) * group)
                for item, r in zip(part.items, rewards.view(-1, group).mean(1).tolist()):
                    row.setdefault(f"reward/{item.family}", 0.0)
                    row[f"reward/{item.family}"] += r
                    row.setdefault(f"n/{item.family}", 0.0)
                    row[f"n/{item.family}"] += 1
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key in [k for k in row if k.startswith("n/")]:
                family = key[2:]
                row[f"reward/{family}"] /= row.pop(key)
            log.append(row)
            if len(log) % 5 == 0:
                recent = log[-20:]
                bar.set_postfix(reward=f"{np.mean([r['reward'] for r in recent]):.3f}",
                                kl=f"{np.mean([r['kl'] for r in recent]):.4f}")
    policy.eval()
    return log
