"""Building and caching the Base -> IN -> RL testbed: :func:`build_testbed`.

A build trains a tiny model of a real HF family on the synthetic tasks and writes, under
the user cache directory (``$VLM_PROBE_CACHE``, else ``$XDG_CACHE_HOME/vlm_probe``, else
``~/.cache/vlm_probe``), one folder named by the recipe's hash::

    testbed/qwen2_5_vl-s0-<hash>/
        base/ in/ rl/        ordinary HF checkpoint directories (safetensors, config, processor)
        data/                the held-out set in the harness formats (see datasets.py)
        recipe.json          the recipe
        build.json           timings (wall and CPU seconds per stage), losses, RL log, accuracies
        variants/<name>/     RL re-runs with a freezing spec (build_rl_variant)

The folder is written under a temporary name and renamed when complete, so an interrupted
build leaves nothing that looks finished; an existing folder is reused unless ``force``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import get_spec
from ..errors import CheckpointError, MergePlanError
from ..io import atomic_directory, atomic_write_json
from ..model.processors import save_processor
from .datasets import write_into
from .encoding import Encoder
from .factory import testbed_model
from .freezing import FreezeSpec, describe_freeze, frozen_names
from .recipe import Recipe
from .rl import grpo
from .tasks import Item, ItemStream, SwapPair, held_out_items, swap_pairs
from .train import evaluate, sft

STAGES: tuple[str, ...] = ("Base", "IN", "RL")
_DIRS = {"base": "base", "in": "in", "rl": "rl"}


def cache_root() -> Path:
    """``$VLM_PROBE_CACHE``, else ``$XDG_CACHE_HOME/vlm_probe``, else ``~/.cache/vlm_probe``."""
    if os.environ.get("VLM_PROBE_CACHE"):
        return Path(os.environ["VLM_PROBE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vlm_probe"
    return Path.home() / ".cache" / "vlm_probe"


def build_dir(recipe: Recipe, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the build of ``recipe`` lives (whether or not it exists yet)."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    size = "reduced-" if recipe.reduced else ""
    return root / "testbed" / f"{recipe.family}-s{recipe.seed}-{size}{recipe.hash()}"


@dataclass(frozen=True)
class Testbed:
    """A finished build: checkpoint paths, the recipe, the held-out data and the build log."""

    path: Path
    recipe: Recipe

    def checkpoint(self, stage: str) -> Path:
        """Checkpoint directory of ``"Base"``, ``"IN"`` or ``"RL"`` (any case), or of a variant name."""
        key = stage.lower()
        if key in _DIRS:
            return self.path / _DIRS[key]
        variant = self.path / "variants" / stage
        if variant.is_dir():
            return variant
        raise CheckpointError(
            f"No checkpoint {stage!r} in {self.path}: use one of {', '.join(STAGES)} or a variant built with "
            "build_rl_variant()."
        )

    @property
    def data(self) -> Path:
        """The held-out set in the evaluation harness's formats."""
        return self.path / "data"

    @property
    def info(self) -> dict[str, Any]:
        """The build log (``build.json``)."""
        return json.loads((self.path / "build.json").read_text())

    def load(self, stage: str = "RL", **kwargs: Any) -> Any:
        """``vlm_probe.load`` of one checkpoint."""
        from ..model import load

        return load(self.checkpoint(stage), **kwargs)

    def load_set(self, *stages: str, **kwargs: Any) -> Any:
        """A :class:`~vlm_probe.CheckpointSet` of the stages (default IN and RL)."""
        from ..model import load_set

        stages = stages or ("IN", "RL")
        return load_set(**{stage: str(self.checkpoint(stage)) for stage in stages}, **kwargs)

    def held_out(self) -> list[Item]:
        """The held-out items (every family, ``described`` included), regenerated from the recipe."""
        return held_out_items(self.recipe.eval_seed, self.recipe.eval_count_map, scenes=self.recipe.scenes)

    def swap_pairs(self) -> list[SwapPair]:
        return swap_pairs(self.recipe.eval_seed + 1, self.recipe.swap_per_task, scenes=self.recipe.scenes)


def _model_from(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText

    from ..model.processors import load_processor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_processor(path)


def _save(model: Any, processor: Any, encoder: Encoder, path: Path) -> None:
    config = model.generation_config
    config.eos_token_id = sorted({encoder.stop_id, int(processor.tokenizer.eos_token_id)})
    config.pad_token_id = int(processor.tokenizer.pad_token_id)
    model.save_pretrained(path)
    save_processor(processor, path)


def _exclusions(items: list[Item], pairs: list[SwapPair]) -> frozenset[str]:
    keys = {item.key for item in items}
    for pair in pairs:
        keys |= {f"{pair.target.key()}|{pair.prompt}", f"{pair.source.key()}|{pair.prompt}"}
    return frozenset(keys)


@contextmanager
def _timed(times: dict[str, dict[str, float]], name: str) -> Iterator[None]:
    """Record the block's wall and CPU seconds (all threads of this process) in ``times[name]``."""
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        times[name] = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


@contextmanager
def _hf_bars(quiet: bool) -> Iterator[None]:
    """Silence transformers' own progress bars for the block when ``quiet`` (restored after)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and enabled:
            hf_logging.enable_progress_bar()


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(f"[testbed] {message}", flush=True)


def build_testbed(
    recipe: Recipe | None = None,
    *,
    seed: int | None = None,
    reduced: bool = False,
    force: bool = False,
    quiet: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Testbed:
    """Build (or reuse) the Base -> IN -> RL testbed of ``recipe``.

    Args:
        recipe: the recipe (default: :class:`Recipe` or, with ``reduced``, ``Recipe.reduced_size()``).
        seed: overrides the recipe's seed.
        reduced: the tiny test-size recipe (a few seconds) when no recipe is given.
        force: rebuild even if the cache holds this recipe's build.
        quiet: no progress bars or messages.
        cache_dir: root of the cache (default: :func:`cache_root`).

    Returns:
        The :class:`Testbed` (paths of ``base/``, ``in/``, ``rl/``, ``data/``).
    """
    if recipe is None:
        recipe = Recipe.reduced_size() if reduced else Recipe()
    if seed is not None:
        recipe = recipe.replace(seed=seed)
    path = build_dir(recipe, cache_dir)
    if path.is_dir() and (path / "build.json").is_file() and not force:
        _say(quiet, f"using the cached build {path}")
        return Testbed(path, recipe)
    _say(quiet, f"building {recipe.family} seed {recipe.seed} into {path}")
    with _hf_bars(quiet), atomic_directory(path, overwrite=True) as tmp:
        info = _build_into(tmp, recipe, quiet)
        atomic_write_json(tmp / "recipe.json", recipe.to_dict())
        atomic_write_json(tmp / "build.json", info)
    _say(quiet, f"done in {info['times']['total']['wall_s']:.0f} s ({info['times']['total']['cpu_s']:.0f} CPU-s)")
    return Testbed(path, recipe)


def _build_into(directory: Path, recipe: Recipe, quiet: bool) -> dict[str, Any]:
    times: dict[str, dict[str, float]] = {}
    with _timed(times, "total"):
        tiny = testbed_model(recipe.family, seed=recipe.stage_seed("init"), sizes=recipe.sizes,
                             rope_theta=recipe.rope_theta, init_gain=recipe.init_gain)
        model, processor = tiny.model, tiny.processor
        spec = get_spec(model.config)
        encoder = Encoder(model, processor, spec)
        with _timed(times, "data"):
            held_out = held_out_items(recipe.eval_seed, recipe.eval_count_map, scenes=recipe.scenes)
            pairs = swap_pairs(recipe.eval_seed + 1, recipe.swap_per_task, scenes=recipe.scenes)
            (directory / "data").mkdir()
            write_into(directory / "data", held_out, pairs, seed=recipe.eval_seed)
        exclude = _exclusions(held_out, pairs)

        def stream(stage: str, mixture: Any) -> ItemStream:
            return ItemStream(recipe.stage_seed(stage), mixture, scenes=recipe.scenes, exclude=exclude, prefix=stage)

        losses: dict[str, list[float]] = {}
        for stage, stage_recipe, name in (("base", recipe.base, "Base"), ("instruct", recipe.instruct, "IN")):
            _say(quiet, f"{name}: {stage_recipe.steps} steps of {stage_recipe.batch_size}")
            with _timed(times, name):
                losses[name] = sft(
                    model, encoder, stream(stage, stage_recipe.mixture), steps=stage_recipe.steps,
                    batch_size=stage_recipe.batch_size, lr=stage_recipe.lr, warmup=stage_recipe.warmup,
                    weight_decay=stage_recipe.weight_decay, desc=name, quiet=quiet,
                )
                _save(model, processor, encoder, directory / _DIRS["base" if name == "Base" else "in"])
        _say(quiet, f"RL: {recipe.rl.steps} steps of {recipe.rl.prompts} prompts x {recipe.rl.group} samples")
        with _timed(times, "RL"):
            # policy and reference start from the saved IN checkpoint, exactly as build_rl_variant does
            policy, _ = _model_from(directory / "in")
            reference, _ = _model_from(directory / "in")
            rl_log = _run_rl(policy, reference, encoder, recipe, recipe.rl.freeze or None, exclude, quiet)
            _save(policy, processor, encoder, directory / "rl")
        with _timed(times, "evaluate"):
            accuracy = {}
            for name, weights in (("Base", _model_from(directory / "base")[0]), ("IN", reference), ("RL", policy)):
                accuracy[name] = evaluate(weights, encoder, held_out).accuracy()
    _say(quiet, "held-out accuracy " + json.dumps({k: {f: round(v, 3) for f, v in a.items()} for k, a in accuracy.items()}))
    return {
        "recipe_hash": recipe.hash(),
        "times": times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "losses": losses,
        "rl_log": rl_log,
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _run_rl(
    model: Any, reference: Any, encoder: Encoder, recipe: Recipe, freeze: FreezeSpec, exclude: frozenset[str],
    quiet: bool, seed_offset: int = 0,
) -> list[dict[str, float]]:
    rl = recipe.rl
    names = frozen_names(model, freeze, encoder.spec, recipe.cuts)
    stream = ItemStream(recipe.stage_seed("rl") + seed_offset, rl.mixture, scenes=recipe.scenes, exclude=exclude,
                        prefix="rl")
    return grpo(
        model, reference, encoder, stream, steps=rl.steps, prompts=rl.prompts, group=rl.group, lr=rl.lr, kl=rl.kl,
        temperature=rl.temperature, max_new_tokens=rl.max_new_tokens,
        seed=recipe.stage_seed("rl-sampling") + seed_offset, frozen_params=names, quiet=quiet,
    )


def build_rl_variant(
    testbed: Testbed,
    freeze: FreezeSpec,
    *,
    name: str | None = None,
    rl_seed: int = 0,
    force: bool = False,
    quiet: bool = False,
) -> Path:
    """Re-run the RL stage from the IN checkpoint with parameters frozen (the necessity experiment).

    Args:
        testbed: a finished build.
        freeze: regions (``{"early"}``, ``("mid", "late")``, ``"vision"``), a
            :class:`~vlm_probe.weights.plans.FreezePlan`, or a callable on parameter names; None
            trains everything (with ``rl_seed=0`` this reproduces ``rl/`` exactly).
        name: the variant's folder name (default ``rl-freeze-<regions>``; required for callables).
        rl_seed: offset of the RL data and sampling seeds (0: the build's own).

    Returns:
        The checkpoint directory ``<testbed>/variants/<name>`` (cached unless ``force``).
    """
    if name is None:
        if callable(freeze):
            raise MergePlanError("Name the variant (name=...) when freezing with a callable.")
        regions = describe_freeze(freeze)
        cuts = getattr(freeze, "cuts", None)  # a FreezePlan's own cuts
        name = "rl-freeze-" + ("-".join(regions) if regions else "none") + (f"-seed{rl_seed}" if rl_seed else "")
        name += f"-cuts{cuts[0]}-{cuts[1]}" if cuts else ""
    path = testbed.path / "variants" / name
    if path.is_dir() and not force:
        _say(quiet, f"using the cached variant {path}")
        return path
    recipe = testbed.recipe
    with _hf_bars(quiet):
        policy, processor = _model_from(testbed.checkpoint("IN"))
        reference, _ = _model_from(testbed.checkpoint("IN"))
    encoder = Encoder(policy, processor, get_spec(policy.config))
    exclude = _exclusions(testbed.held_out(), testbed.swap_pairs())
    _say(quiet, f"RL variant {name}: freezing {describe_freeze(freeze)}")
    start, cpu = time.perf_counter(), time.process_time()
    log = _run_rl(policy, reference, encoder, recipe, freeze, exclude, quiet, seed_offset=rl_seed)
    with _hf_bars(quiet), atomic_directory(path, overwrite=True) as tmp:
        _save(policy, processor, encoder, tmp)
        atomic_write_json(tmp / "variant.json", {
            "freeze": describe_freeze(freeze), "rl_seed": rl_seed, "rl_log": log,
            "frozen_parameters": sorted(frozen_names(policy, freeze, encoder.spec, recipe.cuts)),
            "wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(time.process_time() - cpu, 2),
        })
    return path
