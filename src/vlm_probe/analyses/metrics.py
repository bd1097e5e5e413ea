"""Metrics on next-token logits, for patching, ablation and knockout sweeps.

A metric reads the logits at one position per row (``position``: a single-position group
such as ``"last_prompt"`` or ``"last"``, or an int) and maps
``(logits, clean, corrupt, samples)`` -- logits ``[rows, vocab]`` each, and ``samples`` the
sample id of every row -- to one value per row. Per-sample state (the target tokens of
``logit_diff``) is looked up by sample id, so a metric scores any subset of the samples in any
order (a data-parallel shard, a chunk of variants) correctly.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..errors import InputError


class Metric(Protocol):
    name: str
    position: str | int
    #: whether (value - corrupt) / (clean - corrupt) is meaningful
    normalizable: bool

    def __call__(
        self,
        logits: Float[Tensor, "rows vocab"],
        clean: Float[Tensor, "rows vocab"],
        corrupt: Float[Tensor, "rows vocab"],
        samples: Int[Tensor, " rows"] | None = None,
    ) -> Float[Tensor, " rows"]: ...


def score(
    metric: Any,
    logits: Float[Tensor, "rows vocab"],
    clean: Float[Tensor, "rows vocab"],
    corrupt: Float[Tensor, "rows vocab"],
    samples: Int[Tensor, " rows"],
) -> Float[Tensor, " rows"]:
    """``metric`` on rows of the given sample ids (metrics written before sample ids existed,
    taking only three arguments, are called without them)."""
    try:
        parameters = inspect.signature(metric).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "samples" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return metric(logits, clean, corrupt, samples=samples)
    return metric(logits, clean, corrupt)


TokenSpec = int | str | Sequence[int | str] | Tensor


def token_ids(tokenizer: Any, tokens: TokenSpec, n: int) -> Int[Tensor, " n"]:
    """One token id per row: an id, a string that is exactly one token, or a per-row sequence of either.

    A string that tokenizes to several tokens, or to the unknown token, is refused
    (:class:`~vlm_probe.errors.InputError`): these metrics read one next-token position, and a
    first-token stand-in would score answers sharing a first token ("red circle" vs "red square")
    as equal. Pass the first token that tells the answers apart, or a token id.
    """

    def one(t: int | str) -> int:
        if isinstance(t, (int,)) or (isinstance(t, Tensor) and t.dim() == 0):
            return int(t)
        ids = tokenizer.encode(str(t), add_special_tokens=False)
        if not ids:
            raise InputError(f"{t!r} does not tokenize to any token; pass a non-empty answer or a token id.")
        if len(ids) > 1:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            raise InputError(
                f"{t!r} is {len(ids)} tokens {pieces}, but logit_diff/target_prob score one next token. Pass the "
                "single token that tells the answers apart (or its id); for whole multi-token answers use "
                "answer-level scoring (ablation/knockout level='logprob' or answer_sweep)."
            )
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is not None and ids[0] == unk:
            raise InputError(f"{t!r} is not in the tokenizer's vocabulary (it maps to the unknown token "
                             f"{tokenizer.unk_token!r}); every such answer would score the same.")
        return int(ids[0])

    if isinstance(tokens, Tensor):
        ids = tokens.long().flatten()
        ids = ids.expand(n).clone() if ids.numel() == 1 else ids
    elif isinstance(tokens, (int, str)):
        ids = torch.full((n,), one(tokens), dtype=torch.long)
    else:
        ids = torch.tensor([one(t) for t in tokens], dtype=torch.long)
    if ids.numel() != n:
        raise InputError(f"Got {ids.numel()} tokens for {n} samples; pass one per sample (or a single one for all).")
    return ids


@dataclass
class LogitDiff:
    """``logit[target] - logit[foil]`` at ``position``; targets/foils resolved per row."""

    target: Tensor
    foil: Tensor
    position: str | int = "last_prompt"
    name: str = "logit_diff"
    normalizable: bool = True

    def __call__(self, logits: Tensor, clean: Tensor, corrupt: Tensor, samples: Tensor | None = None) -> Tensor:
        rows = torch.arange(logits.shape[0])
        t, f = _per_row(self.target, logits.shape[0], samples), _per_row(self.foil, logits.shape[0], samples)
        return (logits[rows, t] - logits[rows, f]).float()


@dataclass
class TargetProb:
    """Probability of ``target`` at ``position``."""

    target: Tensor
    position: str | int = "last_prompt"
    name: str = "target_prob"
    normalizable: bool = True

    def __call__(self, logits: Tensor, clean: Tensor, corrupt: Tensor, samples: Tensor | None = None) -> Tensor:
        rows = torch.arange(logits.shape[0])
        return logits.float().softmax(-1)[rows, _per_row(self.target, logits.shape[0], samples)]


@dataclass
class KLToClean:
    """``KL(p_clean || p)`` at ``position`` (0 when the patch restores the clean distribution)."""

    position: str | int = "last_prompt"
    name: str = "kl_to_clean"
    normalizable: bool = False

    def __call__(self, logits: Tensor, clean: Tensor, corrupt: Tensor, samples: Tensor | None = None) -> Tensor:
        return kl(clean, logits)


@dataclass
class Restored:
    """Share of the clean-vs-corrupt output difference a patch restores:
    ``1 - KL(p_clean || p) / KL(p_clean || p_corrupt)`` (1 = fully restored, 0 = no effect).

    Undefined (NaN) for samples whose clean and corrupt outputs agree (``KL < min_kl``): there
    is no difference to restore, and a tiny denominator would only amplify noise. Sweeps warn
    with the number of such samples; summaries leave them out.
    """

    position: str | int = "last_prompt"
    name: str = "restored"
    normalizable: bool = False
    min_kl: float = field(default=1e-6, repr=False)

    def __call__(self, logits: Tensor, clean: Tensor, corrupt: Tensor, samples: Tensor | None = None) -> Tensor:
        gap = kl(clean, corrupt)
        value = 1 - kl(clean, logits) / gap.clamp_min(self.min_kl)
        return torch.where(gap < self.min_kl, torch.full_like(value, float("nan")), value)


@dataclass
class FirstTokenChange:
    """1 where the top next token differs from the unpatched (corrupt) run's, else 0."""

    position: str | int = "last_prompt"
    name: str = "first_token_change"
    normalizable: bool = False

    def __call__(self, logits: Tensor, clean: Tensor, corrupt: Tensor, samples: Tensor | None = None) -> Tensor:
        return (logits.argmax(-1) != corrupt.argmax(-1)).float()


def kl(p_logits: Tensor, q_logits: Tensor) -> Float[Tensor, " rows"]:
    """``KL(softmax(p) || softmax(q))`` per row, in float32."""
    p = F.log_softmax(p_logits.float(), -1)
    q = F.log_softmax(q_logits.float(), -1)
    return (p.exp() * (p - q)).sum(-1).clamp_min(0)


def _per_row(ids: Tensor, rows: int, samples: Tensor | None) -> Tensor:
    """The per-sample token id of each row: looked up by the rows' sample ids (a single id
    serves every row; without sample ids the rows must be the samples, in order)."""
    if ids.numel() == 1:
        return ids.expand(rows)
    if samples is None:
        if rows != ids.numel():
            raise InputError(f"{ids.numel()} per-sample tokens for {rows} rows: pass the rows' sample ids.")
        return ids
    samples = torch.as_tensor(samples, dtype=torch.long)
    if samples.numel() != rows or int(samples.max()) >= ids.numel() or int(samples.min()) < 0:
        raise InputError(f"Sample ids {samples.tolist()[:8]}... do not index the {ids.numel()} per-sample tokens.")
    return ids[samples]


def logit_diff(tokenizer: Any, target: TokenSpec, foil: TokenSpec, n: int, position: str | int = "last_prompt") -> LogitDiff:
    """A :class:`LogitDiff` with tokens resolved by ``tokenizer`` for ``n`` samples.

    Strings must be single tokens (see :func:`token_ids`); a target equal to its foil is refused,
    since its difference is 0 whatever the model does.
    """
    t, f = token_ids(tokenizer, target, n), token_ids(tokenizer, foil, n)
    same = (t == f).nonzero().flatten().tolist()
    if same:
        raise InputError(f"Target and foil are the same token in sample(s) {same[:8]}; their logit difference is 0 "
                         "whatever the model does. Pass a different foil.")
    return LogitDiff(t, f, position)


def target_prob(tokenizer: Any, target: TokenSpec, n: int, position: str | int = "last_prompt") -> TargetProb:
    """A :class:`TargetProb`; strings must be single tokens (see :func:`token_ids`)."""
    return TargetProb(token_ids(tokenizer, target, n), position)


def kl_to_clean(position: str | int = "last_prompt") -> KLToClean:
    return KLToClean(position)


def restored(position: str | int = "last_prompt") -> Restored:
    return Restored(position)


def first_token_change(position: str | int = "last_prompt") -> FirstTokenChange:
    return FirstTokenChange(position)
