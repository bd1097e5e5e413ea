"""Testbed builds: training-step speed by thread count, idle and with another busy process, and a
full build (Base -> IN -> RL and the three freezing re-runs) against the 10-minute goal.

Part 1 (always): median seconds per Base training step of the default recipe with 1 thread,
2 threads and the project default (:func:`vlm_probe.threads.default_threads`), first on an idle
machine, then while a second process spins on one core. The variants are interleaved (round
robin) so that changing load hits all alike; the baseline is 1 thread under the same condition.
The project default must not be slower than 1 thread when a core is busy.

Part 1b (always): wall seconds of a 150-step Base stage trained by 1 process and by 2
data-parallel processes (:mod:`vlm_probe.testbed.data_parallel`, both spawned, so both pay the
same start-up), idle and with the spinning process; the baseline is 1 process under the same
condition. Two processes must not be slower than one when a core is busy.

Part 2 (``--full``): a full build into a fresh temporary cache, wall and CPU seconds per stage,
against the goal of 600 s wall on 2 cores.

    python benchmarks/testbed_build.py                 # part 1 only (about 2 minutes)
    python benchmarks/testbed_build.py --full          # and a full build (about 8 minutes)
    python benchmarks/testbed_build.py --full --family qwen2_5_vl --seed 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, rss_mb  # noqa: E402

GOAL_S = 600.0


def _spin(stop: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    """Keep one core busy (pure Python, single thread) until told to stop."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def step_times(family: str, threads: dict[str, int], repeats: int) -> dict[str, float]:
    """Median seconds per Base training step for each thread setting, interleaved."""
    from vlm_probe.testbed.build import stage_examples
    from vlm_probe.testbed.encoding import Encoder
    from vlm_probe.testbed.factory import testbed_model
    from vlm_probe.testbed.recipe import Recipe
    from vlm_probe.testbed.train import target_loss
    from vlm_probe.arch import get_spec

    recipe = Recipe(family=family)
    tiny = testbed_model(family, seed=0, sizes=recipe.model_sizes, init_gain=1.0, position_std=recipe.position_std,
                         position_layout=recipe.position_layout)
    model, encoder = tiny.model.train(), Encoder(tiny.model, tiny.processor, get_spec(tiny.model.config))
    stream, _ = stage_examples(recipe, "base", frozenset())
    batches = [[next(stream) for _ in range(recipe.base.batch_size)] for _ in range(4)]

    def step(k: int) -> None:
        batch = batches[k % len(batches)]
        for part in encoder([item for item, _ in batch], targets=[r for _, r in batch]):
            loss, _ = target_loss(model, part)
            loss.backward()
        model.zero_grad(set_to_none=True)

    samples: dict[str, list[float]] = {name: [] for name in threads}
    for k in range(repeats + 2):
        for name, n in threads.items():
            torch.set_num_threads(n)
            start = time.perf_counter()
            step(k)
            if k >= 2:  # warm-up
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def stage_walls(family: str, steps: int, worlds: tuple[int, ...]) -> dict[int, float]:
    """Wall seconds of a ``steps``-step Base stage in each number of data-parallel processes."""
    import dataclasses

    from vlm_probe.arch import get_spec
    from vlm_probe.testbed.build import save_checkpoint
    from vlm_probe.testbed.data_parallel import train_stage
    from vlm_probe.testbed.encoding import Encoder
    from vlm_probe.testbed.factory import testbed_model
    from vlm_probe.testbed.recipe import Recipe

    recipe = Recipe(family=family)
    recipe = recipe.replace(base=dataclasses.replace(recipe.base, steps=steps))
    tiny = testbed_model(family, seed=0, sizes=recipe.model_sizes, init_gain=1.0, position_std=recipe.position_std,
                         position_layout=recipe.position_layout)
    walls = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "init"
        save_checkpoint(tiny.model, tiny.processor, Encoder(tiny.model, tiny.processor, get_spec(tiny.model.config)),
                        start)
        for world in worlds:
            began = time.perf_counter()
            train_stage(recipe, "base", start, Path(tmp) / f"out{world}", frozenset(), world=world, quiet=True)
            walls[world] = time.perf_counter() - began
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="llava")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--full", action="store_true", help="also time a full build")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlm_probe.threads import default_threads

    print(f"machine: {machine()}; project default threads here: {default_threads()}")
    settings = {"1 thread": 1, "2 threads": 2, "default": default_threads()}
    idle = step_times(args.family, settings, args.repeats)
    idle_stage = stage_walls(args.family, 150, (1, 2))
    stop = multiprocessing.get_context("spawn").Event()
    spinner = multiprocessing.get_context("spawn").Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(1.0)
        busy = step_times(args.family, {**settings, "default": default_threads()}, args.repeats)
        busy_stage = stage_walls(args.family, 150, (1, 2))
    finally:
        stop.set()
        spinner.join(timeout=5)
    print(f"\nBase training step of the {args.family} testbed (median s, {args.repeats} interleaved repeats)")
    print(f"{'threads':<12}{'idle s':>10}{'vs 1':>8}{'busy s':>10}{'vs 1':>8}")
    for name in settings:
        print(f"{name:<12}{idle[name]:>10.3f}{idle[name] / idle['1 thread']:>8.2f}"
              f"{busy[name]:>10.3f}{busy[name] / busy['1 thread']:>8.2f}")
    print("(busy: another process spins on one core; the default must not be slower than 1 thread there)")
    print("\nBase stage of 150 steps, spawned processes (wall s, start-up included)")
    print(f"{'processes':<12}{'idle s':>10}{'vs 1':>8}{'busy s':>10}{'vs 1':>8}")
    for world in (1, 2):
        print(f"{world:<12}{idle_stage[world]:>10.1f}{idle_stage[world] / idle_stage[1]:>8.2f}"
              f"{busy_stage[world]:>10.1f}{busy_stage[world] / busy_stage[1]:>8.2f}")
    if not args.full:
        return

    from vlm_probe.testbed.build import build_testbed
    from vlm_probe.testbed.recipe import Recipe

    recipe = Recipe(family=args.family, seed=args.seed)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu = time.perf_counter(), time.process_time()
        testbed = build_testbed(recipe, force=True, quiet=args.quiet, cache_dir=tmp)
        wall = time.perf_counter() - start
        info = testbed.info
    load_after = os.getloadavg()
    print(f"\nfull build: recipe {recipe.hash()}, {args.family} seed {args.seed}, "
          f"{info['parameters'] / 1e6:.2f} M parameters, {info['threads']} thread(s), {info['workers']} RL process(es)")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; peak RSS {rss_mb():.0f} MiB")
    steps = {"Base": recipe.base.steps, "IN": recipe.instruct.steps, "RL": recipe.rl.steps}
    print(f"{'stage':<18}{'wall s':>9}{'CPU s':>9}{'wall s/step':>13}")
    for stage, t in {**info["times"], **info["variants"]}.items():
        per_step = f"{t['wall_s'] / steps[stage]:.3f}" if stage in steps else ""
        print(f"{stage:<18}{t['wall_s']:>9.1f}{t['cpu_s']:>9.1f}{per_step:>13}")
    print(f"whole build: wall {wall:.1f} s, ratio to the {GOAL_S:.0f} s goal = {wall / GOAL_S:.2f}")
    print("held-out accuracy:", json.dumps({k: {f: round(v, 3) for f, v in a.items()}
                                            for k, a in info["accuracy"].items()}))


if __name__ == "__main__":
    main()
