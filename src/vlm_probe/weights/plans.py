"""Declarative model surgery: merge plans (transferability) and freezing plans (necessity).

Both speak one *region language* over the unified layer index:

==============  ==================================================================
region          tensors
==============  ==================================================================
``vision``      vision tower (blocks, patch/position embeddings, final vision norm)
``projector``   the vision-to-language projector
``embed``       token embeddings
``early``       LLM decoder layers before the first cut (``cuts``, default N//3, 2N//3)
``mid``         decoder layers between the cuts
``late``        decoder layers from the second cut on
``llm``         every decoder layer
``layers:A-B``  decoder layers A..B, 0-based and inclusive (``layers:5`` for one)
``final_norm``  the LLM's final norm
``lm_head``     the unembedding
``head``        ``final_norm`` and ``lm_head``
``other``       anything else
``all``         everything
==============  ==================================================================

A :class:`MergePlan` names a host checkpoint and rules (later rules win) that replace the
host's tensors in some regions: ``swap`` (take the donor's tensors), ``linear`` (``(1 -
alpha) * host + alpha * donor``) or ``task_arithmetic`` (``host + alpha * (donor - base)``).
Plans are Python objects and YAML.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import yaml

from ..arch import Location, Region
from ..errors import MergePlanError
from .regions import Cuts

Method = Literal["swap", "linear", "task_arithmetic"]
REGION_NAMES: tuple[str, ...] = ("vision", "projector", "embed", "early", "mid", "late", "llm", "final_norm",
                                 "lm_head", "head", "other", "all")
_LAYERS = re.compile(r"^layers:(\d+)(?:-(\d+))?$")

#: The six published block variants (early:mid:late sources).
PUBLISHED_PATTERNS: tuple[str, ...] = ("IN:RL:RL", "RL:IN:IN", "IN:IN:RL", "RL:RL:IN", "IN:RL:IN", "RL:IN:RL")


def check_region(region: str, n_layers: int | None = None) -> str:
    """Validate one region name (raises :class:`MergePlanError` naming the valid ones)."""
    match = _LAYERS.match(region)
    if match:
        start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
        if stop < start:
            raise MergePlanError(f"Region {region!r}: the range is empty (write layers:A-B with A <= B).")
        if n_layers is not None and stop >= n_layers:
            raise MergePlanError(f"Region {region!r} reaches decoder layer {stop}, but the model has {n_layers} "
                                 f"(0..{n_layers - 1}).")
        return region
    if region not in REGION_NAMES:
        raise MergePlanError(f"Unknown region {region!r}; use one of {', '.join(REGION_NAMES)} or layers:A-B.")
    return region


def in_region(location: Location, region: str, cuts: Cuts) -> bool:
    """Whether a located tensor belongs to ``region``."""
    r = location.region
    if region == "all":
        return True
    if region == "vision":
        return r in (Region.VISION, Region.VISION_OTHER)
    if region == "projector":
        return r is Region.PROJECTOR
    if region == "embed":
        return r is Region.EMBED
    if region == "final_norm":
        return r is Region.FINAL_NORM
    if region == "lm_head":
        return r is Region.LM_HEAD
    if region == "head":
        return r in (Region.FINAL_NORM, Region.LM_HEAD)
    if region == "other":
        return r is Region.OTHER
    if r is not Region.LLM or location.layer is None:
        return False
    decoder = location.layer - 1
    if region == "llm":
        return True
    if region in ("early", "mid", "late"):
        return cuts.part(decoder) == region
    match = _LAYERS.match(region)
    assert match is not None
    start, stop = int(match.group(1)), int(match.group(2) or match.group(1))
    return start <= decoder <= stop


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
        except (KeyError, TypeError) as error:
            raise MergePlanError(f"Not a merge plan ({error}); expected host:, rules: [{{regions, source, method, "
                                 "alpha, base}}], optional cuts: and name:.") from error

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> MergePlan:
        return cls.from_dict(yaml.safe_load(text) or {})


# ----------------------------------------------------------------------------- presets


def thirds_plan(pattern: str, *, host: str | None = None, cuts: Sequence[int] | None = None) -> MergePlan:
    """A hard-swap plan from an ``early:mid:late`` pattern such as ``"IN:RL:RL"``.

    The host (default: the first name of the pattern's two, i.e. the model the others are
    transplanted into) supplies the vision tower, projector, embeddings, final norm and lm_head,
    as in the published merges.
    """
    parts = pattern.split(":")
    if len(parts) != 3 or not all(parts):
        raise MergePlanError(f"A thirds pattern is early:mid:late, e.g. 'IN:RL:RL'; got {pattern!r}.")
    names = list(dict.fromkeys(parts))
    host = host or (names[0] if len(names) == 1 else _host_of(parts))
    rules = tuple(Rule((third,), source) for third, source in zip(("early", "mid", "late"), parts) if source != host)
    return MergePlan(host=host, rules=rules, cuts=tuple(cuts) if cuts is not None else None, name=pattern)


def _host_of(parts: list[str]) -> str:
    """For two names A and B in a pattern, the host is the one named ``IN`` if present, else the
    first name appearing in the pattern."""
    names = list(dict.fromkeys(parts))
    return "IN" if "IN" in names else names[0]


def published_variants(
    a: str = "IN", b: str = "RL", *, cuts: Sequence[int] | None = None, host: str | None = None
) -> dict[str, MergePlan]:
    """The six published early:mid:late block variants between ``a`` (IN) and ``b`` (RL)."""
    plans = {}
    for pattern in PUBLISHED_PATTERNS:
        named = pattern.replace("IN", "\0").replace("RL", b).replace("\0", a)
        plans[named] = thirds_plan(named, host=host or a, cuts=cuts)
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
