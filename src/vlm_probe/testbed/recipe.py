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

#: 1.2 M parameters: text 128 x 6 layers, vision 64 x 2 blocks, patch 7 on 42 x 42 images
#: (a 2 x 2 merge gives one vision token per cell of the 3 x 3 grid).
DEFAULT_SIZES = Sizes(
    d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_mlp=256,
    vision_d=64, vision_layers=2, vision_heads=2, vision_mlp=128, patch=7, image_size=42,
)
REDUCED_SIZES = Sizes(
    d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_mlp=64,
    vision_d=16, vision_layers=1, vision_heads=1, vision_mlp=32, patch=7, image_size=42,
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

    steps: int = 300
    prompts: int = 16
    group: int = 8
    lr: float = 5e-5
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
    #: the language model's RoPE base (see :mod:`vlm_probe.testbed.factory`); None keeps the zoo's
    rope_theta: float | None = 10.0
    #: re-initialise linear weights with std gain / sqrt(fan_in); None keeps HF's 0.02
    init_gain: float | None = 1.0
    scenes: SceneOptions = SceneOptions()
    base: SFTStage = SFTStage(
        steps=800, batch_size=32, lr=1e-3, warmup=30,
        mixture=(("perception/color_at", 2.0), ("perception/shape_at", 2.0), ("perception", 4.0), ("text", 2.0)),
    )
    instruct: SFTStage = SFTStage(
        steps=400, batch_size=32, lr=5e-4, warmup=20,
        mixture=(("perception", 0.35), ("v2r", 0.35), ("text", 0.2), ("described", 0.1)),
    )
    rl: RLStage = RLStage()
    #: decoder-layer cuts between early / mid / late thirds (None: N // 3 and 2 * N // 3)
    cuts: tuple[int, int] | None = None
    #: the held-out evaluation set, shared by every seed: its own seed and size per family
    eval_seed: int = 1_000_003
    eval_counts: tuple[tuple[str, int], ...] = (("perception", 700), ("v2r", 500), ("text", 400), ("described", 300))
    swap_per_task: int = 100
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
        yes_no = (("text/more", 1.0), ("v2r/more_color", 1.0), ("v2r/more_shape", 1.0))
        values: dict[str, Any] = dict(
            seed=seed,
            sizes=REDUCED_SIZES,
            base=SFTStage(steps=6, batch_size=16, lr=3e-3, warmup=2,
                          mixture=(("perception/color_at", 1.0), ("perception", 1.0))),
            # yes/no questions: a few steps teach the answer format, so RL rewards vary within groups
            instruct=SFTStage(steps=8, batch_size=16, lr=3e-3, warmup=1,
                              mixture=(*yes_no, ("perception", 0.5), ("described", 0.3))),
            rl=RLStage(steps=3, prompts=4, group=4, lr=1e-3, mixture=(*yes_no, ("perception", 0.3))),
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
