"""What each training stage sees: example streams with a scene-size curriculum, a bounded
demonstration set with distilled-style mistakes, and a prompt pool for RL.

* Base trains on a fresh stream, optionally starting with fewer shapes per scene
  (:func:`curriculum_stream`): with few shapes a question about one shape has few distractors,
  so the model first learns to read a cell at all, then to pick it out among others.
* IN (the cold start) trains on a **bounded** set of reasoning demonstrations
  (:func:`demonstration_set`: v2r, described and text traces), drawn once and repeated in
  shuffled epochs, like a distilled SFT set; a stated fraction of the traces holds one mistake
  (:func:`vlm_probe.testbed.traces.demonstration`). Perception questions, which need no
  trace, keep coming fresh (:func:`cold_start_examples`), as plentiful VQA data does.
* RL samples prompts from a larger pool (:func:`prompt_pool`), answers unseen.

Everything is seeded (``numpy.random.Generator``), so a recipe builds the same data every time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .tasks import Item, ItemStream, Mixture, SceneOptions, parse_mixture
from .traces import demonstration
from .train import Example


def curriculum_stream(
    seed: int,
    mixture: Mixture,
    *,
    scenes: SceneOptions,
    exclude: frozenset[str],
    curriculum: Sequence[tuple[int, int]] = (),
    batch_size: int,
    prefix: str,
) -> Iterator[Example]:
    """(item, correct response) examples; during the first ``until`` steps of each
    ``(until, max_shapes)`` phase, scenes hold at most ``max_shapes`` shapes."""
    phases = [(until * batch_size, dataclasses.replace(scenes, max_shapes=min(m, scenes.max_shapes)))
              for until, m in curriculum]
    streams = [ItemStream(seed + k + 1, mixture, scenes=s, exclude=exclude, prefix=f"{prefix}{k}")
               for k, (_, s) in enumerate(phases)]
    final = ItemStream(seed, mixture, scenes=scenes, exclude=exclude, prefix=prefix)
    drawn = 0
    while True:
        stream = next((s for (until, _), s in zip(phases, streams) if drawn < until), final)
        item = next(stream)
        drawn += 1
        yield item, item.response


@dataclass(frozen=True)
class DemonstrationSet:
    """A bounded SFT set: examples (item, demonstrated response) and which of them hold a mistake."""

    examples: tuple[Example, ...]
    mistakes: tuple[str | None, ...]  #: per example: None, ``"read"`` or ``"step"``

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def error_fraction(self) -> float:
        """Share of demonstrations that hold a mistake (traces only; one-word answers never do)."""
        return float(np.mean([m is not None for m in self.mistakes])) if self.mistakes else 0.0

    def epochs(self, seed: int) -> Iterator[Example]:
        """The examples in a fresh seeded order each epoch, forever."""
        rng = np.random.default_rng(seed)
        while True:
            for index in rng.permutation(len(self.examples)):
                yield self.examples[int(index)]


def demonstration_set(
    seed: int,
    mixture: Mixture,
    size: int,
    *,
    error_rate: float,
    scenes: SceneOptions,
    exclude: frozenset[str],
) -> DemonstrationSet:
    """``size`` demonstrations drawn from ``mixture``; each reasoning trace holds a mistake with
    probability ``error_rate`` (perception answers are given as they are)."""
    if size < 1:
        raise InputError(f"A demonstration set needs at least one example, got size={size}.")
    if not 0.0 <= error_rate < 1.0:
        raise InputError(f"error_rate must lie in [0, 1), got {error_rate}.")
    rng = np.random.default_rng([seed, 1])
    examples, mistakes = [], []
    for item in ItemStream(seed, mixture, scenes=scenes, exclude=exclude, prefix="demo").take(size):
        if item.working is not None:
            worked = demonstration(item.working, rng, error_rate)
            examples.append((item, worked.text))
            mistakes.append(worked.error)
        else:
            examples.append((item, item.response))
            mistakes.append(None)
    return DemonstrationSet(tuple(examples), tuple(mistakes))


def split_mixture(mixture: Mixture) -> tuple[Mixture, Mixture, float]:
    """``(reasoning entries, perception entries, reasoning share)`` of a mixture."""
    entries, weights = parse_mixture(mixture)
    names = [name for name, _ in mixture]
    reasoning = tuple((n, float(w)) for n, (f, _), w in zip(names, entries, weights) if f != "perception")
    perception = tuple((n, float(w)) for n, (f, _), w in zip(names, entries, weights) if f == "perception")
    return reasoning, perception, float(sum(w for _, w in reasoning))


def cold_start_examples(
    seed: int, mixture: Mixture, demos: int, *, error_rate: float, scenes: SceneOptions, exclude: frozenset[str],
) -> tuple[Iterator[Example], DemonstrationSet]:
    """The cold start's examples: reasoning from a bounded demonstration set of ``demos``
    traces (repeated in epochs), perception fresh, each example drawn by the mixture's weights."""
    reasoning, perception, share = split_mixture(mixture)
    if not reasoning:
        raise InputError("A cold start needs reasoning families (v2r, described, text) in its mixture.")
    demo_set = demonstration_set(seed, reasoning, demos, error_rate=error_rate, scenes=scenes, exclude=exclude)
    fresh = curriculum_stream(seed + 1, perception, scenes=scenes, exclude=exclude, batch_size=1,
                              prefix="perception") if perception else None

    def examples() -> Iterator[Example]:
        rng = np.random.default_rng([seed, 3])
        replay = demo_set.epochs(seed)
        while True:
            yield next(replay) if fresh is None or rng.random() < share else next(fresh)

    return examples(), demo_set


def prompt_pool(
    seed: int, mixture: Mixture, size: int | None, *, scenes: SceneOptions, exclude: frozenset[str]
) -> Iterator[Item]:
    """RL prompts: a fresh stream (``size=None``), or ``size`` prompts drawn once and repeated in
    shuffled epochs."""
    stream = ItemStream(seed, mixture, scenes=scenes, exclude=exclude, prefix="rl")
    if size is None:
        return stream
    pool = stream.take(size)
    rng = np.random.default_rng([seed, 2])

    def cycle() -> Iterator[Item]:
        while True:
            for index in rng.permutation(len(pool)):
                yield pool[int(index)]

    return cycle()
