"""What the main job runs on: checkpoints, data files, their manifest, and task-stratified samples.

Everything is checked before any model is loaded: paths, one family and one architecture
across checkpoints, the cuts, and the data folder (every file it finds, and what each enables).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import InputError

#: Data files by role, in the names they may have (the testbed's and the generic ones).
DATA_NAMES: dict[str, tuple[str, ...]] = {
    "swap": ("swap.jsonl", "swap_pairs.jsonl"),
    "general": ("perception.jsonl", "general.jsonl"),
    "math": ("v2r.jsonl", "math.jsonl"),
    "reasoning": ("text.jsonl", "reasoning.jsonl"),
}
#: What each role is, for messages.
DATA_ROLES: dict[str, str] = {
    "swap": "vision-token swap pairs (swap.jsonl, or <task>/data.jsonl in the published layout)",
    "general": "general VQA items for M_vis (perception.jsonl)",
    "math": "math VQA items with descriptions for M_v2r (v2r.jsonl)",
    "reasoning": "text-only reasoning items for M_rea (text.jsonl)",
}
#: ``max_new_tokens`` when neither the options nor the data's manifest say: room for a short
#: reasoning trace ending in "the answer is X" (the testbed's answers take up to about 20 tokens).
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class Inputs:
    """What the analysis runs on: checkpoints, data files, the data's manifest, and the testbed."""

    checkpoints: dict[str, Path]
    data: dict[str, Path]
    testbed: Any = None
    manifest: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None

    @property
    def prompt_format(self) -> dict[str, Any]:
        return dict(self.manifest.get("prompt_format") or {})

    def max_new_tokens(self, given: int | None) -> tuple[int, str]:
        """The generation budget and where it came from: the option, the manifest, or the default."""
        if given is not None:
            return int(given), "--max-new-tokens"
        generation = self.manifest.get("generation") or {}
        for value, where in ((generation.get("max_new_tokens") if isinstance(generation, dict) else None,
                              "manifest.json generation.max_new_tokens"),
                             (self.manifest.get("max_new_tokens"), "manifest.json max_new_tokens")):
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise InputError(f"{self.data_dir}/manifest.json: {where.split(' ', 1)[1]} must be a positive "
                                     f"integer, got {value!r}.")
                return value, where
        return DEFAULT_MAX_NEW_TOKENS, f"the default ({DEFAULT_MAX_NEW_TOKENS})"


def find_data(directory: Path) -> dict[str, Path]:
    """The analysis datasets in a folder, by role (``swap``, ``general``, ``math``, ``reasoning``).

    A folder holding ``<task>/data.jsonl`` files (the published swap-pair layout) is the swap set.
    """
    found = {}
    for key, names in DATA_NAMES.items():
        for name in names:
            if (directory / name).is_file():
                found[key] = directory / name
                break
    if "swap" not in found and any(p.is_file() for p in directory.glob("*/data.jsonl")):
        found["swap"] = directory
    return found


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / "manifest.json"
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); fix or remove it.") from error
    if not isinstance(manifest, dict):
        raise InputError(f"{path} must hold a JSON object.")
    return manifest


def resolve_inputs(
    in_path: str | os.PathLike | None,
    rl_path: str | os.PathLike | None,
    base_path: str | os.PathLike | None,
    data: str | os.PathLike | None,
    *,
    reduced: bool = False,
    seed: int = 0,
    quiet: bool = False,
    cuts: Any = None,
) -> Inputs:
    """Check every input before any work; build (or reuse) the testbed when no checkpoint is given."""
    from ..arch.regions import Cuts
    from ..weights.reader import open_checkpoint

    testbed = None
    if in_path is None and rl_path is None:
        if base_path is not None:
            raise InputError("--base needs --in and --rl (without them the built-in testbed is used).")
        from ..testbed.build import build_testbed
        from ..testbed.recipe import Recipe

        recipe = Recipe.reduced_size(seed=seed) if reduced else Recipe(seed=seed)
        testbed = build_testbed(recipe, quiet=quiet)
        checkpoints = {name: Path(testbed.checkpoint(name)) for name in ("Base", "IN", "RL")}
        data = data or testbed.data
    elif in_path is None or rl_path is None:
        raise InputError("Give both --in and --rl (or neither, to run on the built-in testbed).")
    else:
        checkpoints = {"IN": Path(in_path), "RL": Path(rl_path)}
        if base_path is not None:
            checkpoints = {"Base": Path(base_path), **checkpoints}
    for name, path in checkpoints.items():
        if not Path(path).exists():
            raise InputError(f"--{name.lower()} {path}: no such checkpoint directory.")
    opened = {name: open_checkpoint(path) for name, path in checkpoints.items()}
    ref = opened["IN"]
    for name, ckpt in opened.items():
        if ckpt.spec.name != ref.spec.name:
            raise InputError(f"{name} is a {ckpt.spec.display_name} checkpoint but IN is {ref.spec.display_name}.")
        if {k: v.shape for k, v in ckpt.tensors.items()} != {k: v.shape for k, v in ref.tensors.items()}:
            raise InputError(f"{name} and IN are not checkpoints of one architecture (tensor names or shapes differ).")
    Cuts.make(cuts, ref.n_layers)  # a specific RegionError for bad cuts
    files: dict[str, Path] = {}
    manifest: dict[str, Any] = {}
    directory = None
    if data is not None:
        directory = Path(data)
        if not directory.is_dir():
            raise InputError(f"--data {data}: not a directory.")
        files = find_data(directory)
        if not files:
            names = sorted(n for v in DATA_NAMES.values() for n in v)
            raise InputError(f"--data {data} holds none of {names}, nor <task>/data.jsonl swap pairs.")
        manifest = read_manifest(directory)
    if testbed is not None and not manifest.get("prompt_format"):
        from ..testbed.datasets import PROMPT_FORMAT

        manifest = {**manifest, "prompt_format": dict(PROMPT_FORMAT)}
    return Inputs({k: Path(v) for k, v in checkpoints.items()}, files, testbed, manifest, directory)


def task_of(item: Any) -> str:
    """The task (else category) an item belongs to, for stratified samples and counts."""
    return str(getattr(item, "task", None) or getattr(item, "category", None) or "all")


def stratified(dataset: Any, n: int | None) -> Any:
    """At most ``n`` items of ``dataset``, taken from its tasks in turn (tasks in name order, items
    in file order), so every task is represented; ``None`` keeps every item."""
    if n is None or len(dataset) <= n:
        return dataset
    if n < 1:
        raise InputError(f"A sample size must be a positive number of items, got {n}.")
    by_task: dict[str, list[Any]] = {}
    for item in dataset:
        by_task.setdefault(task_of(item), []).append(item)
    chosen: list[Any] = []
    queues = [list(reversed(by_task[t])) for t in sorted(by_task)]
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop())
    order = {id(item): i for i, item in enumerate(dataset)}
    chosen.sort(key=lambda item: order[id(item)])
    return replace(dataset, items=tuple(chosen))


def task_counts(items: Sequence[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[task_of(item)] = counts.get(task_of(item), 0) + 1
    return dict(sorted(counts.items()))


def describe_sample(items: Sequence[Any], what: str, total: int | None = None) -> str:
    """``n = 24 swap pairs (counting 12, ocr 12) of 200, task-stratified``."""
    counts = task_counts(items)
    tasks = ", ".join(f"{task} {count}" for task, count in counts.items()) if len(counts) > 1 or "all" not in counts \
        else ""
    text = f"n = {len(items)} {what}" + (f" ({tasks})" if tasks else "")
    if total is not None and total > len(items):
        text += f" of {total}, task-stratified"
    return text
