"""The testbed recipe: everything that determines the built checkpoints, frozen and hashed.

Two recipes with the same :meth:`Recipe.hash` build bit-identical checkpoints on the same
software and thread count; the cache directory of a build is named by that hash, so a
changed recipe (or a new :data:`RECIPE_VERSION` of the training code) builds afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tasks import Mixture, SceneOptions, parse_mixture
from .zoo import FAMILIES as ZOO_FAMILIES
from .zoo import Sizes

#: Bump when a code change alters what a recipe builds (data, training, saving).
RECIPE_VERSION = 1

#: 1.2 M parameters: text 128 x 6 layers, vision 64 x 2 blocks, patch 7 on 56 x 56 images
#: (a 2 x 2 merge gives one vision token per grid cell).
DEFAULT_SIZES = Sizes(
    d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_mlp=256,
    vision_d=64, vision_layers=2, vision_heads=2, vision_mlp=128, patch=7, image_size=56,
)
REDUCED_SIZES = Sizes(
    d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_mlp=64,
    vision_d=16, vision_layers=1, vision_heads=1, vision_mlp=32, patch=7, image_size=56,
)


@dataclass(frozen=True)
class SFTStage:
    """A supervised stage: ``steps`` AdamW steps of ``batch_size`` items drawn from ``mixture``."""

    steps: int
    batch_size: int
    lr: float
    mixture: Mixture
    warmup: int = 20
    weight_decay: float = 0.0


@dataclass(frozen=True)
class RLStage:
    """The RL stage (:func:`vlm_probe.testbed.rl.grpo`)."""

    steps: int = 150
    prompts: int = 16
    group: int = 8
    lr: float = 2e-4
    kl: float = 0.1
    temperature: float = 1.0
    max_new_tokens: int = 2
    mixture: Mixture = (("v2r", 0.6), ("perception", 0.2), ("text", 0.1), ("described", 0.1))
    #: regions frozen during RL (see :mod:`vlm_probe.testbed.freezing`); empty: train everything
    freeze: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """How to build the Base -> IN -> RL testbed (see ``docs/guide/testbed.md``)."""

    family: str = "qwen2_5_vl"
    seed: int = 0
    sizes: Sizes = DEFAULT_SIZES
    scenes: SceneOptions = SceneOptions()
    base: SFTStage = SFTStage(
        steps=600, batch_size=64, lr=2e-3, warmup=30,
        mixture=(("perception/color_at", 2.0), ("perception/shape_at", 1.0), ("perception", 4.0)),
    )
    instruct: SFTStage = SFTStage(
        steps=250, batch_size=64, lr=1e-3, warmup=20,
        mixture=(("perception", 0.35), ("v2r", 0.35), ("text", 0.15), ("described", 0.15)),
    )
    rl: RLStage = RLStage()
    #: decoder-layer cuts between early / mid / late thirds (None: N // 3 and 2 * N // 3)
    cuts: tuple[int, int] | None = None
    #: the held-out evaluation set, shared by every seed: its own seed and size per family
    eval_seed: int = 1_000_003
    eval_counts: tuple[tuple[str, int], ...] = (("perception", 350), ("v2r", 250), ("text", 200), ("described", 150))
    swap_per_task: int = 50
    reduced: bool = False
    version: int = field(default=RECIPE_VERSION)

    def __post_init__(self) -> None:
        if self.family not in ZOO_FAMILIES:
            raise ValueError(f"Unknown model family {self.family!r}; the zoo has {', '.join(ZOO_FAMILIES)}.")
        for stage in (self.base, self.instruct):
            parse_mixture(stage.mixture)
        parse_mixture(self.rl.mixture)

    @classmethod
    def reduced_size(cls, seed: int = 0, **changes: Any) -> Recipe:
        """A tiny, fast recipe for tests (seconds): small model, few steps, small eval set."""
        values: dict[str, Any] = dict(
            seed=seed,
            sizes=REDUCED_SIZES,
            base=SFTStage(steps=6, batch_size=16, lr=3e-3, warmup=2,
                          mixture=(("perception/color_at", 1.0), ("perception", 1.0))),
            instruct=SFTStage(steps=4, batch_size=16, lr=2e-3, warmup=1,
                              mixture=(("perception", 1.0), ("v2r", 1.0), ("text", 1.0), ("described", 0.5))),
            rl=RLStage(steps=3, prompts=4, group=4, lr=1e-3),
            eval_counts=(("perception", 14), ("v2r", 10), ("text", 8), ("described", 5)),
            swap_per_task=3,
            reduced=True,
        )
        values.update(changes)
        return cls(**values)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def with_rl(self, **changes: Any) -> Recipe:
        """The recipe with RL-stage fields changed (``recipe.with_rl(freeze=("early",))``)."""
        return dataclasses.replace(self, rl=dataclasses.replace(self.rl, **changes))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        def tuples(value: Any) -> Any:
            if isinstance(value, list):
                return tuple(tuples(v) for v in value)
            return value

        d = dict(data)
        d["sizes"] = Sizes(**d["sizes"])
        d["scenes"] = SceneOptions(**d["scenes"])
        d["base"] = SFTStage(**{k: tuples(v) for k, v in d["base"].items()})
        d["instruct"] = SFTStage(**{k: tuples(v) for k, v in d["instruct"].items()})
        d["rl"] = RLStage(**{k: tuples(v) for k, v in d["rl"].items()})
        d["eval_counts"] = tuples(d["eval_counts"])
        d["cuts"] = tuples(d["cuts"])
        return cls(**d)

    def hash(self, length: int = 12) -> str:
        """Hex digest of the canonical JSON of the recipe."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:length]

    def stage_seed(self, stage: str) -> int:
        """A seed for one stage's randomness (data stream, sampling), derived from the recipe seed."""
        names = ("init", "base", "instruct", "rl", "rl-sampling")
        return int(np.random.SeedSequence([self.seed, names.index(stage)]).generate_state(1)[0])

    @property
    def eval_count_map(self) -> dict[str, int]:
        return dict(self.eval_counts)
