"""Greedy responses kept beside a testbed checkpoint, so each checkpoint answers each item once.

A build scores Base, IN, RL and every freezing re-run on the held-out items and swap scenes;
``vlm-probe testbed report`` and the report's freezing section score the same checkpoints on
the same items. :func:`scored` answers only the items whose responses are not yet in
``<checkpoint>/responses.json`` and grades every response when read, with the project's one
grader (:func:`vlm_probe.evaluation.grade`), so a grader change never leaves stale verdicts.
Entries are keyed by item id *and* question and scene, and the file records the generation
budget; a different budget starts a fresh file. Responses are written atomically; a checkpoint
folder that cannot be written is scored without keeping them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..evaluation.grading import grade
from ..io import atomic_write_json
from .tasks import Item, SwapPair, held_out_items, swap_pairs
from .traces import MAX_NEW_TOKENS
from .train import Scored, evaluate

FILE = "responses.json"


def evaluation_items(recipe: Any) -> list[Item]:
    """What every checkpoint of a build is scored on: the held-out items of every family, then
    each swap pair's target and source scene with the shared prompt (family ``swap``)."""
    held_out = held_out_items(recipe.eval_seed, recipe.eval_count_map, scenes=recipe.scenes)
    return held_out + swap_items(swap_pairs(recipe.eval_seed + 1, recipe.swap_per_task, scenes=recipe.scenes))


def swap_items(pairs: Sequence[SwapPair]) -> list[Item]:
    """Each swap pair's target and source scene as items with the pair's shared prompt."""
    items = []
    for pair in pairs:
        items.append(Item(f"{pair.id}-target", "swap", pair.task, pair.prompt, pair.target_answer, pair.target))
        items.append(Item(f"{pair.id}-source", "swap", pair.task, pair.prompt, pair.source_answer, pair.source))
    return items


def _entry(item: Item) -> str:
    return f"{item.id}|{item.key}"


def stored_responses(checkpoint: Path, max_new_tokens: int = MAX_NEW_TOKENS) -> dict[str, str]:
    """The responses kept beside ``checkpoint`` for this generation budget (entry -> text)."""
    path = Path(checkpoint) / FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data["responses"] if data.get("max_new_tokens") == max_new_tokens else {}


def scored(checkpoint: Path, items: Sequence[Item], load: Callable[[], tuple[Any, Any]], *,
           max_new_tokens: int = MAX_NEW_TOKENS) -> Scored:
    """The checkpoint's greedy responses to ``items`` graded, generating only the missing ones.

    ``load()`` returns ``(model, encoder)``; it is called only when something is missing.
    """
    known = stored_responses(checkpoint, max_new_tokens)
    missing = [item for item in items if _entry(item) not in known]
    if missing:
        model, encoder = load()
        fresh = evaluate(model, encoder, missing, max_new_tokens=max_new_tokens)
        known = {**known, **{_entry(item): text for item, text in zip(fresh.items, fresh.responses)}}
        try:
            atomic_write_json(Path(checkpoint) / FILE, {"max_new_tokens": max_new_tokens, "responses": known})
        except OSError:
            pass  # a read-only checkpoint is scored all the same
    texts = [known[_entry(item)] for item in items]
    return Scored(list(items), texts, [grade(text, item.answer).correct for text, item in zip(texts, items)])
