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
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..arch import get_spec
from ..errors import CheckpointError, MergePlanError
from ..io import atomic_directory, atomic_write_json
from ..model.processors import save_processor
from ..threads import data_parallel_processes, default_threads, default_workers, torch_threads
from . import responses
from .curriculum import DemonstrationSet, cold_start_examples, curriculum_stream, prompt_pool, split_mixture
from .data_parallel import train_stage
from .datasets import write_into
from .encoding import Encoder
from .factory import testbed_model
from .freezing import FreezeSpec, describe_freeze, frozen_names
from .recipe import Recipe, SFTStage
from .responses import swap_items
from .rl import ESTIMATOR, grpo
from .tasks import Item, SwapPair, held_out_items, swap_pairs
from .train import Example, sft

STAGES: tuple[str, ...] = ("Base", "IN", "RL")
#: RL re-runs a default build makes next to ``rl/``: each third of the decoder frozen (the necessity experiment)
THIRD_VARIANTS: tuple[str, ...] = ("early", "mid", "late")
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


def load_stage_model(path: Path) -> tuple[Any, Any, Encoder]:
    """A saved testbed checkpoint: model (float32), processor and encoder."""
    model, processor = _model_from(path)
    return model, processor, Encoder(model, processor, get_spec(model.config))


def scorer(path: Path, quiet: bool = True) -> tuple[Any, Encoder]:
    """The model and encoder that answer items for a saved checkpoint (for :func:`responses.scored`)."""
    with _hf_bars(quiet):
        model, _, encoder = load_stage_model(path)
    return model, encoder


def save_checkpoint(model: Any, processor: Any, encoder: Encoder, path: Path) -> None:
    """Save a testbed checkpoint (weights, config with the stop tokens, processor)."""
    config = model.generation_config
    config.eos_token_id = sorted(encoder.end_ids)
    config.pad_token_id = int(processor.tokenizer.pad_token_id)
    with _hf_bars(quiet=True):  # a bar for writing one small shard says nothing
        model.save_pretrained(path)
    save_processor(processor, path)


def _exclusions(items: list[Item], pairs: list[SwapPair]) -> frozenset[str]:
    """Keys training must skip: every held-out question about a scene (text arithmetic has a few
    hundred distinct questions, facts a model is meant to know, so those are shared by design)."""
    keys = {item.key for item in items if item.scene is not None}
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
    variants: Sequence[str] = THIRD_VARIANTS,
    workers: int | None = None,
    threads: int | None = None,
) -> Testbed:
    """Build (or reuse) the Base -> IN -> RL testbed of ``recipe``, and RL re-runs with parts frozen.

    The RL stage and the ``variants`` (one RL re-run per region frozen, for
    :func:`~vlm_probe.testbed.necessity.necessity_table`) all start from IN and are independent:
    they run side by side in ``workers`` single-threaded processes.

    Args:
        recipe: the recipe (default: :class:`Recipe` or, with ``reduced``, ``Recipe.reduced_size()``).
        seed: overrides the recipe's seed.
        reduced: the tiny test-size recipe (a few seconds) when no recipe is given.
        force: rebuild even if the cache holds this recipe's build.
        quiet: no progress bars or messages.
        cache_dir: root of the cache (default: :func:`cache_root`).
        variants: regions frozen in each RL re-run (default the three thirds of the decoder;
            ``()`` for none); they land in ``variants/rl-freeze-<region>``.
        workers: processes for the supervised stages' shards (data parallel, at most
            ``SFTStage.shards``) and for the RL runs (default
            :func:`vlm_probe.threads.default_workers`; 1 runs everything in this process, with
            the same weights; the reduced recipe defaults to 1).
        threads: torch threads for training (default :func:`vlm_probe.threads.default_threads`:
            1 on a 2-core machine, which keeps its speed when another process holds a core).

    Returns:
        The :class:`Testbed` (paths of ``base/``, ``in/``, ``rl/``, ``data/``, ``variants/``).
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
    if workers is None:
        workers = 1 if recipe.reduced else default_workers()
    with _hf_bars(quiet), torch_threads(threads) as n_threads, atomic_directory(path, overwrite=True) as tmp:
        info = _build_into(tmp, recipe, quiet, tuple(variants), workers, n_threads)
        atomic_write_json(tmp / "recipe.json", recipe.to_dict())
        atomic_write_json(tmp / "build.json", info)
    _say(quiet, f"done in {info['times']['total']['wall_s']:.0f} s ({info['times']['total']['cpu_s']:.0f} CPU-s)")
    return Testbed(path, recipe)


def stage_examples(recipe: Recipe, stage: str, exclude: frozenset[str]) -> tuple[Iterator[Example], DemonstrationSet | None]:
    """The examples one supervised stage (``"base"`` or ``"instruct"``) trains on: with ``demos``,
    reasoning from a bounded demonstration set and perception fresh
    (:func:`~vlm_probe.testbed.curriculum.cold_start_examples`), else a fresh stream."""
    config: SFTStage = getattr(recipe, stage)
    seed = recipe.stage_seed(stage)
    if config.demos is not None:
        return cold_start_examples(seed, config.mixture, config.demos, error_rate=config.error_rate,
                                   scenes=recipe.scenes, exclude=exclude)
    stream = curriculum_stream(seed, config.mixture, scenes=recipe.scenes, exclude=exclude,
                               curriculum=config.curriculum, batch_size=config.batch_size, prefix=stage)
    return stream, None


def _supervised_stage(recipe: Recipe, stage: str, tiny: Any, encoder: Encoder, start: Path, out: Path,
                      exclude: frozenset[str], workers: int, quiet: bool,
                      info: dict[str, Any]) -> tuple[list[float], dict[str, Any]]:
    """Train ``tiny.model`` through one supervised stage (in place) and save it to ``out``: in
    this process, or data parallel over ``min(workers, shards)`` processes that start from the
    checkpoint ``start`` (written here for Base). Returns the losses and, when parallel, the
    processes' CPU seconds and count (for ``build.json``)."""
    config: SFTStage = getattr(recipe, stage)
    name = "Base" if stage == "base" else "IN"
    stream, demos = stage_examples(recipe, stage, exclude)
    if demos is not None:
        share = split_mixture(config.mixture)[2]
        info["demonstrations"] = {
            "size": len(demos), "error_rate": config.error_rate, "error_fraction": demos.error_fraction,
            "epochs": config.steps * config.batch_size * share / len(demos),
        }
    world = data_parallel_processes(workers, config.shards)
    _say(quiet, f"{name}: {config.steps} steps of {config.batch_size}"
                + (f" on {len(demos)} demonstrations" if demos is not None else "")
                + (f", {config.shards} shards in {world} processes" if world > 1 else ""))
    if world == 1:
        losses = sft(tiny.model, encoder, stream, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                     warmup=config.warmup, weight_decay=config.weight_decay, shards=config.shards, desc=name,
                     quiet=quiet)
        save_checkpoint(tiny.model, tiny.processor, encoder, out)
        return losses, {}
    if stage == "base":  # the processes start from the initial weights on disk
        save_checkpoint(tiny.model, tiny.processor, encoder, start)
    losses, cpu_s = train_stage(recipe, stage, start, out, exclude, world=world, quiet=quiet)
    tiny.model.load_state_dict(_model_from(out)[0].state_dict())
    return losses, {"cpu_s": round(cpu_s, 2), "processes": world}


def _build_into(directory: Path, recipe: Recipe, quiet: bool, variants: tuple[str, ...], workers: int,
                threads: int) -> dict[str, Any]:
    times: dict[str, dict[str, float]] = {}
    info: dict[str, Any] = {}
    with _timed(times, "total"):
        tiny = testbed_model(recipe.family, seed=recipe.stage_seed("init"), sizes=recipe.model_sizes,
                             rope_theta=recipe.rope_theta, init_gain=recipe.init_gain,
                             position_std=recipe.position_std, position_layout=recipe.position_layout)
        model, processor = tiny.model, tiny.processor
        spec = get_spec(model.config)
        encoder = Encoder(model, processor, spec)
        with _timed(times, "data"):
            held_out = held_out_items(recipe.eval_seed, recipe.eval_count_map, scenes=recipe.scenes)
            pairs = swap_pairs(recipe.eval_seed + 1, recipe.swap_per_task, scenes=recipe.scenes)
            (directory / "data").mkdir()
            write_into(directory / "data", held_out, pairs, seed=recipe.eval_seed)
        exclude = _exclusions(held_out, pairs)

        losses: dict[str, list[float]] = {}
        start = directory / ".init"
        for stage, name in (("base", "Base"), ("instruct", "IN")):
            out = directory / _DIRS["base" if name == "Base" else "in"]
            with _timed(times, name):
                losses[name], processes = _supervised_stage(recipe, stage, tiny, encoder, start, out, exclude, workers,
                                                            quiet, info)
            times[name].update(processes)
            start = out
        if (directory / ".init").exists():
            shutil.rmtree(directory / ".init")
        jobs = [RLJob(recipe.to_dict(), str(directory / "in"), str(directory / "rl"), recipe.rl.freeze or None,
                      0, quiet, threads)]
        jobs += [RLJob(recipe.to_dict(), str(directory / "in"), str(directory / "variants" / variant_name((v,))),
                       (v,), 0, quiet, threads) for v in variants]
        _say(quiet, f"RL ({ESTIMATOR}): {recipe.rl.steps} steps of {recipe.rl.prompts} prompts x {recipe.rl.group} "
                    f"samples, and {len(variants)} re-runs with a third frozen, in {min(workers, len(jobs))} process(es)")
        with _timed(times, "RL and variants"):
            reports = run_rl_jobs(jobs, workers)
        times["RL"] = {k: reports[0][k] for k in ("wall_s", "cpu_s")}
        rl_log = reports[0]["rl_log"]
        with _timed(times, "evaluate"):  # RL's responses come from its own process (run_rl_job)
            accuracy, items = {}, held_out + swap_items(pairs)
            for name in ("Base", "IN", "RL"):
                folder = directory / _DIRS[name.lower()]
                by_family = responses.scored(folder, items, lambda: scorer(folder)).accuracy()
                accuracy[name] = {family: acc for family, acc in by_family.items() if family != "swap"}
    _say(quiet, "held-out accuracy " + json.dumps({k: {f: round(v, 3) for f, v in a.items()} for k, a in accuracy.items()}))
    return {
        "recipe_hash": recipe.hash(),
        "times": times,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "losses": losses,
        "rl_estimator": ESTIMATOR,
        "rl_log": rl_log,
        "variants": {Path(job.out).name: {k: r[k] for k in ("wall_s", "cpu_s")} for job, r in zip(jobs[1:], reports[1:])},
        "workers": min(workers, len(jobs)),
        "accuracy": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
        **info,
    }


@dataclass(frozen=True)
class RLJob:
    """One RL run from the IN checkpoint (picklable, so it can run in a worker process).

    ``freeze`` is a region tuple, a :class:`~vlm_probe.weights.plans.FreezePlan` or None; ``out``
    the checkpoint directory it writes (atomically), with a ``variant.json`` beside the weights
    when it is a re-run (any ``out`` not named ``rl``).
    """

    recipe: dict[str, Any]
    in_path: str
    out: str
    freeze: Any
    seed_offset: int
    quiet: bool
    threads: int


def run_rl_job(job: RLJob) -> dict[str, Any]:
    """Run one RL job in this process; returns its log, frozen parameters and times."""
    recipe = Recipe.from_dict(job.recipe)
    start, cpu = time.perf_counter(), time.process_time()
    with _hf_bars(job.quiet), torch_threads(job.threads):
        policy, processor = _model_from(Path(job.in_path))
        encoder = Encoder(policy, processor, get_spec(policy.config))
        held_out = held_out_items(recipe.eval_seed, recipe.eval_count_map, scenes=recipe.scenes)
        pairs = swap_pairs(recipe.eval_seed + 1, recipe.swap_per_task, scenes=recipe.scenes)
        exclude = _exclusions(held_out, pairs)
        rl = recipe.rl
        names = frozen_names(policy, job.freeze, encoder.spec, recipe.cuts)
        stream = prompt_pool(recipe.stage_seed("rl") + job.seed_offset, rl.mixture, rl.pool, scenes=recipe.scenes,
                             exclude=exclude)
        reference = _model_from(Path(job.in_path))[0] if rl.kl > 0 else None
        log = grpo(
            policy, reference, encoder, stream, steps=rl.steps, prompts=rl.prompts, group=rl.group, lr=rl.lr,
            kl=rl.kl, temperature=rl.temperature, max_new_tokens=rl.max_new_tokens, format_reward=rl.format_reward,
            seed=recipe.stage_seed("rl-sampling") + job.seed_offset, frozen_params=names,
            desc=Path(job.out).name, quiet=job.quiet,
        )
        report = {"freeze": describe_freeze(job.freeze), "rl_seed": job.seed_offset, "rl_log": log,
                  "frozen_parameters": sorted(names), "wall_s": round(time.perf_counter() - start, 2),
                  "cpu_s": round(time.process_time() - cpu, 2), "threads": job.threads}
        with atomic_directory(job.out, overwrite=True) as tmp:
            save_checkpoint(policy, processor, encoder, tmp)
            responses.scored(tmp, held_out + swap_items(pairs), lambda: (policy, encoder))  # kept beside the weights
            if Path(job.out).name != "rl":
                atomic_write_json(tmp / "variant.json", report)
    return report


def run_rl_jobs(jobs: Sequence[RLJob], workers: int) -> list[dict[str, Any]]:
    """Run independent RL jobs, in ``workers`` processes (spawned, single-threaded each) or here."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_rl_job(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        return list(pool.map(run_rl_job, jobs))


def variant_name(freeze: FreezeSpec, rl_seed: int = 0) -> str:
    """``rl-freeze-<regions>[-seed<n>][-cuts<a>-<b>]``, the folder of an RL re-run."""
    regions = describe_freeze(freeze)
    cuts = getattr(freeze, "cuts", None)  # a FreezePlan's own cuts
    name = "rl-freeze-" + ("-".join(regions) if regions else "none") + (f"-seed{rl_seed}" if rl_seed else "")
    return name + (f"-cuts{cuts[0]}-{cuts[1]}" if cuts else "")


def build_rl_variant(
    testbed: Testbed,
    freeze: FreezeSpec,
    *,
    name: str | None = None,
    rl_seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    threads: int | None = None,
) -> Path:
    """Re-run the RL stage from the IN checkpoint with parameters frozen (the necessity experiment).

    A default build already holds the three thirds (``build_testbed(variants=...)``); other
    specs run here, in this process.

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
        if callable(freeze) and not hasattr(freeze, "is_frozen"):
            raise MergePlanError("Name the variant (name=...) when freezing with a callable.")
        name = variant_name(freeze, rl_seed)
    path = testbed.path / "variants" / name
    if path.is_dir() and not force:
        _say(quiet, f"using the cached variant {path}")
        return path
    _say(quiet, f"RL variant {name}: freezing {describe_freeze(freeze)}")
    run_rl_job(RLJob(testbed.recipe.to_dict(), str(testbed.checkpoint("IN")), str(path), freeze, rl_seed, quiet,
                     threads if threads is not None else default_threads()))
    return path
