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

from ..errors import InputError
from .factory import POSITION_LAYOUTS
from .tasks import Mixture, SceneOptions, parse_mixture
from .zoo import FAMILIES as ZOO_FAMILIES
from .zoo import Sizes

#: Bump when a code change alters what a recipe builds (data, training, saving).
RECIPE_VERSION = 3

#: Model sizes per family: one vision token per cell of the 3 x 3 grid (42 x 42 images; Qwen-VL
#: patch 7 with a 2 x 2 merge, LLaVA's CLIP tower patch 14), text 128 x 6 layers.
FAMILY_SIZES: dict[str, Sizes] = {
    "llava": Sizes(d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_mlp=256,
                   vision_d=64, vision_layers=2, vision_heads=2, vision_mlp=128, patch=14, image_size=42),
    "qwen2_5_vl": Sizes(d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_mlp=256,
                        vision_d=64, vision_layers=2, vision_heads=2, vision_mlp=128, patch=7, image_size=42),
}
REDUCED_SIZES: dict[str, Sizes] = {
    family: dataclasses.replace(sizes, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, d_mlp=64,
                                vision_d=16, vision_layers=1, vision_heads=1, vision_mlp=32)
    for family, sizes in FAMILY_SIZES.items()
}
#: The families the testbed recipe is tuned and tested for (others build through the same code).
TESTBED_FAMILIES: tuple[str, ...] = tuple(FAMILY_SIZES)


@dataclass(frozen=True)
class SFTStage:
    """A supervised stage: ``steps`` AdamW steps of ``batch_size`` examples from ``mixture``.

    ``demos`` bounds the reasoning data (v2r, described, text) to a demonstration set of that
    many traces, drawn once and repeated in shuffled epochs (the cold start; perception questions
    stay fresh); ``None`` draws fresh examples every step.
    ``error_rate`` is the share of demonstrated reasoning traces that hold one mistake, as
    distilled data does. ``curriculum`` holds ``(until_step, max_shapes)`` phases that start
    with fewer shapes per scene. Each batch splits into ``shards`` fixed shards (data parallel over
    up to that many processes, with the same weights for any number of them; see
    :mod:`vlm_probe.testbed.data_parallel`).
    """

    steps: int
    batch_size: int
    lr: float
    mixture: Mixture
    warmup: int = 20
    weight_decay: float = 0.0
    demos: int | None = None
    error_rate: float = 0.0
    curriculum: tuple[tuple[int, int], ...] = ()
    shards: int = 2


@dataclass(frozen=True)
class RLStage:
    """The RL stage (:func:`vlm_probe.testbed.rl.grpo`, Dr. GRPO) on a pool of ``pool`` prompts."""

    steps: int = 120
    prompts: int = 16
    group: int = 8
    lr: float = 2e-4
    kl: float = 0.05
    temperature: float = 1.0
    max_new_tokens: int = 24
    format_reward: float = 0.1
    pool: int | None = 20_000
    mixture: Mixture = (("v2r", 0.75), ("described", 0.1), ("text", 0.05), ("perception", 0.1))
    #: regions frozen during RL (see :mod:`vlm_probe.testbed.freezing`); empty: train everything
    freeze: tuple[str, ...] = ()


#: Base's perception questions: reading one addressed cell (``color_at``, ``shape_at``) is learned
#: last, so it is weighted up; counting is learned first (see the testbed guide).
PERCEPTION_MIXTURE: Mixture = (
    ("perception/color_at", 2.5), ("perception/shape_at", 2.5), ("perception/row_of", 1.5),
    ("perception/column_of", 1.5), ("perception/count", 0.5), ("perception/count_color", 0.5),
    ("perception/count_shape", 0.5),
)


@dataclass(frozen=True)
class Recipe:
    """How to build the Base -> IN -> RL testbed (see ``docs/guide/testbed.md``)."""

    family: str = "llava"
    seed: int = 0
    #: model sizes (None: :data:`FAMILY_SIZES` of the family)
    sizes: Sizes | None = None
    #: the language model's RoPE base (see :mod:`vlm_probe.testbed.factory`); None keeps the zoo's
    rope_theta: float | None = None
    #: re-initialise linear weights with std gain / sqrt(fan_in); None keeps HF's 0.02
    init_gain: float | None = 1.0
    #: re-draw the vision tower's learned position embeddings with this std; None keeps HF's
    position_std: float | None = 1.0
    #: their layout: ``"grid"`` (factorised row + column codes) or ``"random"`` (see factory.py)
    position_layout: str = "grid"
    scenes: SceneOptions = SceneOptions(max_shapes=4)
    base: SFTStage = SFTStage(
        steps=2400, batch_size=32, lr=1e-3, warmup=30, curriculum=((200, 2),),
        mixture=(*PERCEPTION_MIXTURE, ("text", 1.0)),
    )
    instruct: SFTStage = SFTStage(
        steps=150, batch_size=32, lr=5e-4, warmup=20, demos=500, error_rate=0.3,
        mixture=(("perception", 0.3), ("v2r", 0.35), ("text", 0.15), ("described", 0.2)),
    )
    rl: RLStage = RLStage()
    #: decoder-layer cuts between early / mid / late thirds (None: N // 3 and 2 * N // 3)
    cuts: tuple[int, int] | None = None
    #: the held-out evaluation set, shared by every seed: its own seed and size per family
    eval_seed: int = 1_000_003
    eval_counts: tuple[tuple[str, int], ...] = (("perception", 700), ("v2r", 1000), ("text", 400), ("described", 500))
    swap_per_task: int = 100
    reduced: bool = False
    version: int = field(default=RECIPE_VERSION)

    @property
    def model_sizes(self) -> Sizes:
        """The sizes the model is built with."""
        if self.sizes is not None:
            return self.sizes
        table = REDUCED_SIZES if self.reduced else FAMILY_SIZES
        return table.get(self.family, table["qwen2_5_vl"])

    def __post_init__(self) -> None:
        if self.family not in ZOO_FAMILIES:
            raise InputError(f"Unknown model family {self.family!r}; the zoo has {', '.join(ZOO_FAMILIES)}.")
        if self.position_layout not in POSITION_LAYOUTS:
            raise InputError(f"Unknown position_layout {self.position_layout!r}; use one of "
                             f"{', '.join(POSITION_LAYOUTS)}.")
        for stage in (self.base, self.instruct):
            if stage.shards < 1 or stage.shards > stage.batch_size:
                raise InputError(f"shards must lie in 1..batch_size ({stage.batch_size}); got {stage.shards}.")
            parse_mixture(stage.mixture)
        parse_mixture(self.rl.mixture)

    @classmethod
    def reduced_size(cls, seed: int = 0, family: str = "llava", **changes: Any) -> Recipe:
        """A tiny, fast recipe for tests (seconds): small model, few steps, small eval set."""
        yes_no = (("text/more", 1.0), ("v2r/more_color", 1.0), ("v2r/more_shape", 1.0))
        values: dict[str, Any] = dict(
            family=family,
            seed=seed,
            base=SFTStage(steps=6, batch_size=16, lr=3e-3, warmup=2, curriculum=((2, 2),),
                          mixture=(("perception/color_at", 1.0), ("perception", 1.0), ("text", 0.5))),
            # yes/no questions: a few steps teach the answer format, so RL rewards vary within groups
            instruct=SFTStage(steps=10, batch_size=16, lr=3e-3, warmup=1, demos=48, error_rate=0.25,
                              mixture=(*yes_no, ("perception", 0.5), ("described", 0.3))),
            rl=RLStage(steps=3, prompts=4, group=4, lr=1e-3, max_new_tokens=24, pool=64,
                       mixture=(*yes_no, ("perception", 0.3))),
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
        d["sizes"] = Sizes(**d["sizes"]) if d.get("sizes") is not None else None
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
