"""Writing the testbed's held-out data in the evaluation harness's dataset formats.

One folder holds (image paths are relative to it):

* ``perception.jsonl``, ``v2r.jsonl``: VQA items ``{"id", "question", "image", "answer",
  "category", "description", "task"}``; ``description`` is a text description that determines
  the scene (for M_v2r: a blank image plus the description).
* ``text.jsonl``: text-only items ``{"id", "question", "answer", "category"}``.
* ``swap.jsonl``: vision-token-swap pairs ``{"id", "task", "target_image", "source_image",
  "prompt", "meta": {"target_answer", "source_answer", "target_description",
  "source_description"}}`` (the published layout).
* ``images/*.png`` and ``manifest.json`` (counts, seed, files).

The ``described`` family is not written: it is the v2r set asked about ``description`` with a
blank image, which the harness builds from ``v2r.jsonl``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_directory, atomic_write_json
from .scenes import CELL, GRID, blank_image, render
from .tasks import Item, SceneOptions, SwapPair, held_out_items, swap_pairs
from .traces import MAX_NEW_TOKENS

VQA_FILES = {"perception": "perception.jsonl", "v2r": "v2r.jsonl"}
TEXT_FILE = "text.jsonl"
#: How the harness must word prompts for the testbed (``described`` items put the description
#: before the question; blank images may be white): ``PromptFormat(**PROMPT_FORMAT)``.
PROMPT_FORMAT: dict[str, Any] = {"description_template": "{description} {question}", "blank_color": [255, 255, 255]}
SWAP_FILE = "swap.jsonl"


def _jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def write_into(
    directory: str | os.PathLike, items: Sequence[Item], pairs: Sequence[SwapPair], *, seed: int | None = None
) -> dict[str, Any]:
    """Write ``items`` and ``pairs`` into an existing (empty) ``directory``; returns the manifest."""
    directory = Path(directory)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in (*VQA_FILES, "text")}
    for item in items:
        if item.family in VQA_FILES:
            assert item.scene is not None
            relative = f"images/{item.id}.png"
            render(item.scene).save(directory / relative)
            rows[item.family].append(
                {
                    "id": item.id,
                    "question": item.question,
                    "image": relative,
                    "answer": item.answer,
                    "category": item.family,
                    "description": item.scene.describe(),
                    "task": item.task,
                }
            )
        elif item.family == "text":
            rows["text"].append(
                {"id": item.id, "question": item.question, "answer": item.answer, "category": item.family}
            )
    swap_rows = []
    for pair in pairs:
        paths = {}
        for side, scene in (("target", pair.target), ("source", pair.source)):
            paths[side] = f"images/{pair.id}-{side}.png"
            render(scene).save(directory / paths[side])
        swap_rows.append(
            {
                "id": pair.id,
                "task": pair.task,
                "target_image": paths["target"],
                "source_image": paths["source"],
                "prompt": pair.prompt,
                "meta": {
                    "target_answer": pair.target_answer,
                    "source_answer": pair.source_answer,
                    "target_description": pair.target.describe(),
                    "source_description": pair.source.describe(),
                },
            }
        )
    grid = next((item.scene.grid for item in items if item.scene is not None), GRID)
    blank_image(grid * CELL).save(images / "blank.png")
    for family, name in VQA_FILES.items():
        _jsonl(directory / name, rows[family])
    _jsonl(directory / TEXT_FILE, rows["text"])
    _jsonl(directory / SWAP_FILE, swap_rows)
    manifest = {
        "seed": seed,
        "prompt_format": PROMPT_FORMAT,
        "generation": {"max_new_tokens": MAX_NEW_TOKENS},
        "files": {**VQA_FILES, "text": TEXT_FILE, "swap": SWAP_FILE, "blank_image": "images/blank.png"},
        "counts": {**{f: len(rows[f]) for f in VQA_FILES}, "text": len(rows["text"]), "swap": len(swap_rows)},
    }
    atomic_write_json(directory / "manifest.json", manifest)
    return manifest


def write_datasets(
    directory: str | os.PathLike,
    *,
    seed: int = 1_000_003,
    counts: dict[str, int] | None = None,
    swap_per_task: int = 50,
    scenes: SceneOptions = SceneOptions(),
    overwrite: bool = False,
) -> Path:
    """Write a seeded held-out set in the harness formats to ``directory`` (atomically).

    Args:
        seed: the data seed (the testbed's held-out set uses ``Recipe.eval_seed``).
        counts: items per family (``perception``, ``v2r``, ``text``).
        swap_per_task: swap pairs per swap task.
        overwrite: replace an existing directory.
    """
    counts = counts or {"perception": 350, "v2r": 250, "text": 200}
    items = held_out_items(seed, counts, scenes=scenes)
    pairs = swap_pairs(seed + 1, swap_per_task, scenes=scenes)
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_into(tmp, items, pairs, seed=seed)
    return Path(directory)
