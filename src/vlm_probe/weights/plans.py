"""Declarative model surgery: merge plans (transferability) and freezing plans (necessity).

Both speak the region language of :mod:`vlm_probe.arch.regions` over the unified layer index:
``vision``, ``projector``, ``embed``, ``early``, ``mid``, ``late`` (split by ``cuts``, default
N//3, 2N//3), ``llm``, ``layers:A-B`` (0-based, inclusive), ``final_norm``, ``lm_head``,
``head``, ``other``, ``all``.

A :class:`MergePlan` names a host checkpoint and rules (later rules win) that replace the
host's tensors in some regions: ``swap`` (take the donor's tensors), ``linear`` (``(1 -
alpha) * host + alpha * donor``) or ``task_arithmetic`` (``host + alpha * (donor - base)``).
Plans are Python objects and YAML.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml

from ..arch import Location
from ..arch.regions import REGION_NAMES, Cuts, check_region, in_region
from ..errors import MergePlanError

Method = Literal["swap", "linear", "task_arithmetic"]

#: The six published block variants (early:mid:late sources).
PUBLISHED_PATTERNS: tuple[str, ...] = ("IN:RL:RL", "RL:IN:IN", "IN:IN:RL", "RL:RL:IN", "IN:RL:IN", "RL:IN:RL")
#: ``host=`` value of :func:`thirds_plan` meaning "the early third's source" (the published splice).
EARLY_HOST = "early"

__all__ = ["EARLY_HOST", "FreezePlan", "MergePlan", "PUBLISHED_PATTERNS", "REGION_NAMES", "Rule", "block_grid",
           "check_region", "in_region", "interpolation", "published_variants", "thirds_plan"]


@dataclass(frozen=True)
class Rule:
    """Replace the host's tensors in ``regions`` using ``source`` (and ``base`` for task arithmetic)."""

    regions: tuple[str, ...]
    source: str
    method: Method = "swap"
    alpha: float = 1.0
    base: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "regions", tuple([self.regions] if isinstance(self.regions, str) else self.regions))

    def check(self, names: Sequence[str], n_layers: int | None = None) -> None:
        if self.method not in ("swap", "linear", "task_arithmetic"):
            raise MergePlanError(f"Unknown merge method {self.method!r}; use swap, linear or task_arithmetic.")
        if not math.isfinite(self.alpha):
            raise MergePlanError(f"Rule for {list(self.regions)}: alpha must be finite, got {self.alpha}.")
        if self.source not in names:
            raise MergePlanError(f"Rule for {list(self.regions)} takes {self.source!r}, which is not one of the "
                                 f"checkpoints ({', '.join(names)}).")
        if self.method == "task_arithmetic":
            if self.base is None:
                raise MergePlanError("task_arithmetic needs base= (the checkpoint the donor's update is taken from).")
            if self.base not in names:
                raise MergePlanError(f"task_arithmetic base {self.base!r} is not one of the checkpoints ({', '.join(names)}).")
        for region in self.regions:
            check_region(region, n_layers)


@dataclass(frozen=True)
class MergePlan:
    """A host checkpoint plus rules; every tensor no rule touches comes from the host.

    Attributes:
        host: the checkpoint whose tensors (and config, processor, tokenizer) the merge starts from.
        rules: applied in order; for a tensor matched by several rules the last one wins.
        cuts: where ``mid`` and ``late`` start (0-based decoder indices); default N//3, 2N//3.
        name: a label for tables, e.g. ``"IN:RL:RL"``.
    """

    host: str
    rules: tuple[Rule, ...] = ()
    cuts: tuple[int, int] | None = None
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.cuts is not None:
            object.__setattr__(self, "cuts", tuple(int(c) for c in self.cuts))

    def check(self, names: Sequence[str], n_layers: int | None = None) -> None:
        """Validate names, regions, methods and coefficients against the available checkpoints."""
        if self.host not in names:
            raise MergePlanError(f"The host {self.host!r} is not one of the checkpoints ({', '.join(names)}).")
        if n_layers is not None:
            Cuts.make(self.cuts, n_layers)
        for rule in self.rules:
            rule.check(names, n_layers)

    def rule_for(self, location: Location, cuts: Cuts) -> Rule | None:
        """The rule that decides a tensor (the last matching one), or None (host's tensor)."""
        chosen = None
        for rule in self.rules:
            if any(in_region(location, region, cuts) for region in rule.regions):
                chosen = rule
        return chosen

    def checkpoints_used(self) -> list[str]:
        used = [self.host]
        for rule in self.rules:
            for name in (rule.source, rule.base):
                if name is not None and name not in used:
                    used.append(name)
        return used

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "host": self.host,
                               "rules": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rules]}
        for rule in out["rules"]:
            rule["regions"] = list(rule["regions"])
        if self.cuts is not None:
            out["cuts"] = list(self.cuts)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MergePlan:
        try:
            rules = tuple(Rule(**{**rule, "regions": tuple(rule["regions"])}) for rule in data.get("rules", []))
            return cls(host=data["host"], rules=rules, cuts=data.get("cuts"), name=data.get("name", ""))
        except (KeyError, TypeError, AttributeError) as error:
            raise MergePlanError(f"Not a merge plan ({error}); expected host:, rules: [{{regions, source, method, "
                                 "alpha, base}}], optional cuts: and name:.") from error

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MergePlan:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise MergePlanError(f"The plan is not valid YAML: {' '.join(str(error).split())}.") from error
        return cls.from_dict(data or {})


# ----------------------------------------------------------------------------- presets


def thirds_plan(pattern: str, *, host: str | None = EARLY_HOST, cuts: Sequence[int] | None = None) -> MergePlan:
    """A hard-swap plan from an ``early:mid:late`` pattern such as ``"IN:RL:RL"``.

    Args:
        pattern: the source of each decoder third, e.g. ``"RL:IN:IN"``.
        host: the checkpoint that supplies everything outside the decoder layers (vision tower,
            projector, embeddings, final norm, lm_head) and the config, processor and tokenizer.
            ``"early"`` (the default) takes them from the early third's source, as the published
            splice code does (it loads the early third's model and copies the other thirds' layers
            into it): ``RL:IN:IN`` keeps RL's vision tower and head. A checkpoint name (``"IN"``)
            keeps that checkpoint's instead, whatever the pattern. ``None`` means ``"early"``.
        cuts: where mid and late start (0-based decoder indices; default N//3, 2N//3).
    """
    parts = pattern.split(":")
    if len(parts) != 3 or not all(parts):
        raise MergePlanError(f"A thirds pattern is early:mid:late, e.g. 'IN:RL:RL'; got {pattern!r}.")
    chosen = parts[0] if host in (None, EARLY_HOST) else host
    rules = tuple(Rule((third,), source) for third, source in zip(("early", "mid", "late"), parts) if source != chosen)
    return MergePlan(host=chosen, rules=rules, cuts=tuple(cuts) if cuts is not None else None, name=pattern)


def published_variants(
    a: str = "IN", b: str = "RL", *, cuts: Sequence[int] | None = None, host: str | None = EARLY_HOST
) -> dict[str, MergePlan]:
    """The six published early:mid:late block variants between ``a`` (IN) and ``b`` (RL).

    ``host`` as in :func:`thirds_plan`: by default (``"early"``) each variant's vision tower,
    projector, embeddings, final norm and lm_head come from its early third's source, which
    reproduces the published variants; ``host=a`` keeps ``a``'s in all six.
    """
    plans = {}
    for pattern in PUBLISHED_PATTERNS:
        named = pattern.replace("IN", "\0").replace("RL", b).replace("\0", a)
        plans[named] = thirds_plan(named, host=host, cuts=cuts)
    return plans


def block_grid(
    a: str, b: str, n_layers: int, *, block: int | None = 1, host: str | None = None
) -> dict[str, MergePlan]:
    """Contiguous blocks of ``b``'s decoder layers swapped into ``a``: every block of ``block``
    layers (a sliding window over depth, ``a + b[i:i+block]`` for each start ``i``), or with
    ``block=None`` the full grid, every ``b[i:j]`` for ``0 <= i < j <= n_layers``
    (``n (n + 1) / 2`` plans, e.g. for a start x stop heat map)."""
    sizes = range(1, n_layers + 1) if block is None else [block]
    if block is not None and not 1 <= block <= n_layers:
        raise MergePlanError(f"block must lie in 1..{n_layers} (or None for every block); got {block}.")
    plans = {}
    for size in sizes:
        for start in range(0, n_layers - size + 1):
            stop = start + size - 1
            region = f"layers:{start}" if size == 1 else f"layers:{start}-{stop}"
            name = f"{a}+{b}[{start}:{stop + 1}]"
            plans[name] = MergePlan(host=host or a, rules=(Rule((region,), b),), name=name)
    return plans


def interpolation(a: str, b: str, alphas: Sequence[float], regions: Sequence[str] = ("llm",)) -> dict[str, MergePlan]:
    """Linear interpolation plans ``(1 - alpha) * a + alpha * b`` over ``regions``."""
    return {f"{a}->{b} alpha={alpha:g}": MergePlan(host=a, rules=(Rule(tuple(regions), b, "linear", float(alpha)),),
                                                  name=f"alpha={alpha:g}")
            for alpha in alphas}


# ----------------------------------------------------------------------------- freezing


@dataclass(frozen=True)
class FreezePlan:
    """Regions to freeze during training (the published necessity experiment)."""

    frozen: tuple[str, ...]
    cuts: tuple[int, int] | None = None
    name: str = field(default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "frozen", tuple([self.frozen] if isinstance(self.frozen, str) else self.frozen))
        for region in self.frozen:
            check_region(region)

    def is_frozen(self, location: Location, cuts: Cuts) -> bool:
        return any(in_region(location, region, cuts) for region in self.frozen)
