"""One engine for every sweep: a list of variants (each a list of interventions) over a batch.

    from vlm_probe.analyses.engine import Variant, Source, Logits, run
    from vlm_probe.interventions import Patch

    variants = [Variant((Patch("layer_out", layer, "vision", source="clean"),)) for layer in range(vlm.n_layers)]
    out = run(vlm, corrupt, variants, Logits("last_prompt"), sources={"clean": Source(vlm, clean)})
    out.outputs[3]       # [batch, vocab] logits of the variant that patches layer 3

Readouts: :class:`Logits` (at one position per row), :class:`AnswerLogprob` (log-probability
of the teacher-forced answer) and :class:`Greedy` (greedy answers; interventions that act at
every token do so at every step).

Fast by construction, with exactly the numbers of one plain run per variant:

* the unedited ("base") run happens once; its vision-tower output is replayed for the
  repeated rows (``skip``) in chunks that do not edit the vision tower or the projector;
* variants are packed into batched forwards (``max_rows`` rows at most: variants x samples),
  each intervention applied in its own invoke to its own block of rows
  (:class:`~vlm_probe.interventions.sites.Scope`);
* every decoder layer below a chunk's shallowest edit replays the base run's output;
* in causal families whose cache holds every position, a chunk whose edits (and readout)
  start at column ``s`` after the image reruns only columns ``s:`` over the base run's KV
  cache; interventions that can edit the cache instead (a vision KV swap through the last
  layer) move ``s`` past the image;
* chunks are cut by dynamic programming over the recomputed work (:func:`plan_chunks`), and
  greedy answers of every variant of a chunk are decoded together.

Each intervention runs in its own invoke, so the order in which variants touch the model
never matters (nnsight serves each invoke at its own sites); rows are scoped by the
:class:`~vlm_probe.interventions.sites.Scope`, because nnsight's per-invoke row narrowing
cannot cut vision-tower activations (no batch axis in Qwen-VL) or attention masks the model
passes as ``None``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import nnsight
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..interventions.objects import Intervention, variant_from_json, variant_json
from ..interventions.sites import Scope
from ..model.inputs import Batch
from .batched import Capture, answer_index, capture, keep_logits, metric_index, plan_chunks, repeat_rows, sum_by_row, tile
from .decode import check_greedy, greedy, prefill_state
from .generation import Generation, decode_rows
from .options import RunOptions

if TYPE_CHECKING:
    from ..model.wrapper import VLM


@dataclass(frozen=True)
class Variant:
    """One variant of a run: interventions applied together (none: the unedited run)."""

    interventions: tuple[Intervention, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "interventions", tuple(self.interventions))

    def to_json(self) -> str:
        return variant_json(self.interventions)

    @classmethod
    def from_json(cls, text: str) -> Variant:
        return cls(tuple(variant_from_json(text)))

    def label(self) -> str:
        return " + ".join(iv.label() for iv in self.interventions) or "unedited"


@dataclass(frozen=True)
class Source:
    """A run interventions read activations from: a model (another checkpoint, or the same)
    on a batch of the same samples and width."""

    vlm: VLM
    batch: Batch


@dataclass(frozen=True)
class Logits:
    """Readout: the logits at one position per row (a one-token group or an int), ``[batch, vocab]``."""

    position: str | int = "last_prompt"

    def first_column(self, batch: Batch) -> int:
        return int(metric_index(batch, self.position)[1].min())


@dataclass(frozen=True)
class AnswerLogprob:
    """Readout: the summed log-probability of each row's teacher-forced answer tokens, ``[batch]``."""

    def first_column(self, batch: Batch) -> int:
        return int(answer_index(batch)[1].min())


@dataclass(frozen=True)
class Greedy:
    """Readout: each row's greedy answer (a :class:`~vlm_probe.analyses.generation.Generation`),
    cut at its first end token."""

    config: GenerationConfig
    eos: frozenset[int] = frozenset()  #: end tokens (default: the config's)

    def __post_init__(self) -> None:
        check_greedy(self.config)
        if not self.eos:
            ids = self.config.eos_token_id
            object.__setattr__(self, "eos", frozenset([ids] if isinstance(ids, int) else ids or ()))

    def first_column(self, batch: Batch) -> int:
        return batch.width - 1


Readout = Logits | AnswerLogprob | Greedy


@dataclass
class EngineRun:
    """What :func:`run` returns."""

    #: per variant: ``Float[Tensor, "batch vocab"]`` logits, ``Float[Tensor, " batch"]`` log-probs, or ``list[Generation]``
    outputs: list[Any]
    base: Capture  #: the unedited run (its ``logits`` at a Logits readout's position)
    sources: dict[str, Capture] = field(default_factory=dict)  #: the captured source runs (their logits too)
    forwards: int = 0  #: batched forwards run (prefills; decode steps not counted)


@dataclass
class _Plan:
    layer: int  #: decoder layers below it are replayed
    start: int  #: first column rerun
    vision: bool  #: edits the vision tower / projector


def run(
    vlm: VLM,
    batch: Batch,
    variants: Sequence[Variant | Sequence[Intervention]],
    readout: Readout,
    *,
    sources: Mapping[str, Source] | None = None,
    values: Mapping[str, Any] | None = None,
    options: RunOptions | None = None,
    desc: str = "variants",
) -> EngineRun:
    """Run every variant over ``batch`` and read each out.

    Args:
        batch: the samples every variant runs (this process's share).
        variants: lists of interventions; ``[]`` is the unedited run.
        readout: what to read from each variant.
        sources: named runs the interventions read from (``Patch(source="clean")``),
            captured once at the sites they need.
        values: named values passed to every ``apply`` (means, vectors, ...).
        options: ``max_rows``, ``reuse``, ``progress``.

    Returns:
        :class:`EngineRun` with one output per variant, in order.
    """
    options = options or RunOptions()
    variants = [v if isinstance(v, Variant) else Variant(tuple(v)) for v in variants]
    n, width, depth = len(batch), batch.width, vlm.n_layers
    sources = dict(sources or {})
    logits_at = metric_index(batch, readout.position) if isinstance(readout, Logits) else None

    needs: dict[str, set[tuple[str, int]]] = defaultdict(set)
    cached_sources: set[str] = set()
    for variant in variants:
        for iv in variant.interventions:
            for name, sites in iv.sources(vlm).items():
                needs[name] |= sites
                if iv.edits_cache:
                    cached_sources.add(name)
    captured = {name: capture(src.vlm, src.batch, needs.get(name, ()),
                              metric_index(src.batch, readout.position) if isinstance(readout, Logits) else None,
                              cache=options.reuse and name in cached_sources)
                for name, src in sources.items()}
    shared = {**captured, **dict(values or {})}

    # where each variant acts: first assuming the base run's cache is usable (to size what it keeps)
    guess = _plan(vlm, batch, variants, readout, options, shared, captured, None)
    replaying = [p for p in guess if p.layer > 0]
    keep_from = min((p.start for p in replaying), default=0)
    deepest = max((p.layer for p in replaying), default=0)
    base = capture(vlm, batch, [("layer_out", j) for j in range(deepest)], logits_at, vision=options.reuse,
                   cache=options.reuse, start=keep_from)
    final = _plan(vlm, batch, variants, readout, options, shared, captured, base)
    for p in final:  # without the cache, starts fall to 0: replay only what was kept
        if p.layer > 0 and (p.start < keep_from or p.layer > deepest):
            p.layer = 0
    context = {**shared, "base": base}

    per_chunk = max(1, options.max_rows // n)
    order = sorted(range(len(variants)), key=lambda v: (final[v].start, final[v].layer))
    schedule = plan_chunks([final[v].start for v in order], [final[v].layer for v in order], n, width, depth,
                           per_chunk)
    outputs: list[Any] = [None] * len(variants)
    bar = tqdm(total=len(variants), desc=desc, unit="variant", disable=not options.progress)
    for span in schedule:
        ids = [order[i] for i in span]
        chunk = _run_chunk(vlm, batch, [variants[v] for v in ids], [final[v] for v in ids], readout, base, context)
        for v, value in zip(ids, chunk):
            outputs[v] = value
        bar.update(len(ids))
    bar.close()
    return EngineRun(outputs, base, captured, len(schedule))


def _plan(
    vlm: VLM, batch: Batch, variants: list[Variant], readout: Readout, options: RunOptions,
    shared: Mapping[str, Any], captured: Mapping[str, Capture], base: Capture | None,
) -> list[_Plan]:
    """For each variant: the decoder layers it can replay, the first column it must rerun, and
    whether it edits the vision tower (``base=None``: before the base run, assuming its cache)."""
    context = {**shared, "base": base}
    cache_ok = options.reuse and vlm.causal_text and (base is None or base.cache is not None)
    out = []
    for variant in variants:
        ivs = variant.interventions
        layer = min((iv.first_layer(vlm) for iv in ivs), default=vlm.n_layers)
        column = readout.first_column(batch)
        for iv in ivs:
            by_cache = None
            if cache_ok and iv.edits_cache:  # before the base run: assume its positions are the source's
                by_cache = iv.cache_column(vlm, batch, context if base is not None
                                           else {**context, "base": captured.get(getattr(iv, "source", ""))})
            column = min(column, by_cache if by_cache is not None else iv.first_column(vlm, batch))
        start = column if cache_ok and vlm.suffix_rerun_valid(batch, column) else 0
        layer = max(layer, 0) if options.reuse else 0
        if isinstance(readout, Greedy) and base is not None and base.cache is None:
            layer = 0  # replayed layers would leave holes in the cache the generation continues over
        out.append(_Plan(layer, start, any(iv.touches_vision(vlm) for iv in ivs)))
    return out


def _run_chunk(
    vlm: VLM, batch: Batch, variants: list[Variant], plans: list[_Plan], readout: Readout, base: Capture,
    values: Mapping[str, Any],
) -> list[Any]:
    """One batched forward (and, for greedy answers, one decode loop) for a chunk of variants."""
    n, k, width = len(batch), len(variants), batch.width
    rows_total = n * k
    start = min(p.start for p in plans)
    shallowest = min(p.layer for p in plans)
    cache = None
    if start:
        inputs, cache = base.cache.continuation(vlm, batch, start, k)
    else:
        inputs = repeat_rows(batch, k)
    answer = None
    if isinstance(readout, Logits):
        rows, positions = metric_index(batch, readout.position, k)
    elif isinstance(readout, AnswerLogprob):
        rows, positions, targets = answer_index(batch)
        rows = torch.cat([rows + i * n for i in range(k)])
        positions, targets = tile(positions, k), tile(targets, k)
        answer = (rows, targets)
    else:
        rows, positions = torch.arange(rows_total), torch.full((rows_total,), width - 1)
    keep, column = keep_logits(positions - start)
    greedy_run = isinstance(readout, Greedy)
    replay_vision = not start and base.vision is not None and not any(p.vision for p in plans)
    lm_positions = past = None
    trace_options: dict[str, Any] = {"logits_to_keep": keep}
    if not start:
        trace_options["use_cache"] = greedy_run
    with torch.no_grad(), vlm.trace(**trace_options) as tracer:
        with tracer.invoke(inputs):
            if replay_vision:
                vlm.vision.root.skip(base.vision.tiled(k))
            if greedy_run and not start:
                lm_positions = nnsight.save(vlm.language_model.inputs[1].get("position_ids"))
            for layer in range(shallowest):
                vlm.layers[layer].skip(tile(base.activations[("layer_out", layer)][:, start - base.start :], k))
            logits = vlm.lm_head.output[rows, column].save()
            if greedy_run and not start:
                past = nnsight.save(vlm.output_cache(vlm.output))
        for i, variant in enumerate(variants):
            scope = Scope(batch, block=(i, k), start=start, values=values, cache=cache)
            for iv in variant.interventions:
                with tracer.invoke():
                    iv.apply(vlm, scope)
    if isinstance(readout, Logits):
        return list(logits.float().cpu().split(n))
    if answer is not None:
        token_rows, targets = answer
        token_lp = logits.float().log_softmax(-1)[torch.arange(len(targets)), targets]
        return list(sum_by_row(token_lp, token_rows, rows_total).split(n))
    return _decode(vlm, batch, variants, readout, base, values, logits, cache if start else past,
                   tile(base.cache.positions(batch), k, dim=-2) if start else lm_positions, start, shallowest)


def _decode(
    vlm: VLM, batch: Batch, variants: list[Variant], readout: Greedy, base: Capture, values: Mapping[str, Any],
    first: Float[Tensor, "rows vocab"], cache: Any, positions: Tensor | None, start: int, shallowest: int,
) -> list[list[Generation]]:
    n, k = len(batch), len(variants)
    if shallowest:
        base.cache.fill(cache, range(shallowest), start, k)
    state = prefill_state(vlm, batch, k, cache, positions)
    every = [[iv for iv in variant.interventions if iv.acts_at_decode()] for variant in variants]

    def step(tracer: Any, s: int, column: int) -> None:
        for i, ivs in enumerate(every):
            scope = Scope(batch, block=(i, k), start=column, step=s, values=values)
            for iv in ivs:
                with tracer.invoke():
                    iv.apply(vlm, scope)

    eos = set(readout.eos)
    ids = greedy(vlm, state, first, readout.config, eos, step if any(every) else None)
    generations = decode_rows(vlm.tokenizer, ids, eos)
    return [generations[i * n : (i + 1) * n] for i in range(k)]


def rerun(
    vlm: VLM,
    batch: Batch,
    variant: Variant | str,
    readout: Readout,
    *,
    sources: Mapping[str, Source] | None = None,
    values: Mapping[str, Any] | None = None,
) -> Any:
    """Run one variant again, e.g. from a result's ``variant`` column (its JSON), with the same
    readout; plain full runs (no reuse), so it is also an independent check of the sweep."""
    variant = Variant.from_json(variant) if isinstance(variant, str) else variant
    out = run(vlm, batch, [variant], readout, sources=sources, values=values,
              options=RunOptions(reuse=False, progress=False))
    return out.outputs[0]
