"""Layer ablation and attention knockout sweeps.

``layer_ablation_sweep`` makes one decoder layer the identity at a time (the published
reasoning-localization probe) and measures the effect on the answer: greedy answers graded
against gold (``level="answer"``) or the teacher-forced log-probability of the gold answer
(``level="logprob"``). ``knockout_sweep`` blocks attention edges from a query group to a key
group (e.g. answer <- vision) one layer at a time, with the same two levels.

Both pack many layer variants into one batched forward or generation; the vision tower
runs once per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions.attention import knockout
from ..interventions.positions import PositionSpec, positions_label, resolve_positions
from ..model.inputs import Batch
from ..results import Result
from ..stats import bootstrap, paired_difference
from .batched import capture, chunks, repeat_rows
from .generation import (
    config_record,
    decode_new,
    eos_ids,
    Grader,
    apply_grader,
    exact_match,
    fixed_steps,
    generation_defaults,
    greedy_config,
)
from .parallel import gather_frame, shard_indices

Apply = Callable[[Any, Batch, Sequence[Any], int, int], None]


class AblationResult(Result):
    """Per (sample, layer) outcome of an ablation or knockout sweep.

    Columns: ``sample``, ``layer`` (0-based; -1 is the unablated baseline), ``unified_layer``,
    ``intervention``, ``level``, and ``answer``/``correct`` (answer level) or ``logprob``
    (log-probability of the gold answer, logprob level).
    """

    kind = "ablation"

    @property
    def value_column(self) -> str:
        return "correct" if self.meta.get("level") == "answer" else "logprob"

    def summary(self, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Per layer: mean value with a 95% CI, and the paired change against the baseline."""
        col = self.value_column
        frame = self.frame
        base = frame[frame["layer"] == -1].set_index("sample")[col].astype(float)
        rows = []
        for layer, part in frame[frame["layer"] >= 0].groupby("layer", sort=True):
            part = part.set_index("sample")[col].astype(float)
            est = bootstrap(part.to_numpy(), n_resamples=n_resamples, seed=seed)
            diff = paired_difference(base.loc[part.index].to_numpy(), part.to_numpy(), n_resamples=n_resamples,
                                     seed=seed)
            rows.append({"layer": layer, "unified_layer": layer + 1, "value": est.value, "low": est.low,
                         "high": est.high, "change": diff.value, "change_low": diff.low, "change_high": diff.high,
                         "n": est.n})
        out = pd.DataFrame(rows)
        out.attrs["baseline"] = float(base.mean()) if len(base) else float("nan")
        return out

    def plot(self, **kwargs: Any) -> go.Figure:
        summary = self.summary(n_resamples=500)
        x = list(summary["unified_layer"])
        label = "accuracy" if self.value_column == "correct" else "log p(answer)"
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=x, y=summary["value"], mode="lines+markers", name=f"{label}, layer ablated"))
        fig.add_trace(go.Scatter(x=x + x[::-1], y=list(summary["high"]) + list(summary["low"])[::-1], fill="toself",
                                 opacity=0.2, line={"width": 0}, showlegend=False, hoverinfo="skip"))
        fig.add_hline(y=summary.attrs["baseline"], line_dash="dot", annotation_text="no ablation")
        what = self.meta.get("intervention", "ablation")
        fig.update_layout(title=kwargs.get("title", f"{what} by layer"), xaxis_title="layer (unified index)",
                          yaxis_title=label, template="plotly_white", height=420)
        return fig


# ----------------------------------------------------------------------------- variant runner


def _answer_logprob_index(batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(rows, prediction positions, target ids, row of each token) for the answer tokens."""
    rows, pos, ids, owner = [], [], [], []
    input_ids = batch.inputs["input_ids"]
    for r, layout in enumerate(batch.layout):
        answer = layout.spans["answer"]
        if not answer:
            raise InputError("level='logprob' needs teacher-forced answers: prepare the batch with answers=[...].")
        for p in answer:
            rows.append(r)
            pos.append(p - 1)
            ids.append(int(input_ids[r, p]))
            owner.append(r)
    return (torch.tensor(rows), torch.tensor(pos), torch.tensor(ids), torch.tensor(owner))


def run_variants(
    vlm: Any,
    base: Batch,
    variants: Sequence[Any],
    apply: Apply,
    *,
    level: str,
    config: Any,
    max_rows: int,
    reuse_vision: bool,
    progress: bool,
    desc: str,
) -> list[Any]:
    """Run ``base`` once per variant (many variants per forward), ``apply`` editing each
    variant's rows; returns one answer (``level="answer"``) or answer log-prob per row,
    variants-major."""
    b = len(base)
    per_chunk = max(1, max_rows // b)
    vision = capture(vlm, base, vision=True).vision if reuse_vision else None
    out: list[Any] = []
    bar = tqdm(total=len(variants), desc=desc, unit="layer", disable=not progress)
    for chunk in chunks(list(variants), per_chunk):
        k = len(chunk)
        batch = repeat_rows(base, k)
        if level == "answer":
            steps = config.max_new_tokens
            with torch.no_grad(), generation_defaults(vlm.hf, fixed_steps(config)), \
                    vlm.generate(batch, generation_config=fixed_steps(config)) as tracer:
                if vision is not None:
                    vlm.vision.root.skip(vision.tiled(k))
                for _ in tracer.iter[0:steps]:
                    apply(vlm, batch, chunk, k, b)
                ids = tracer.result.save()
            out += decode_new(vlm, ids, batch.width, eos_ids(vlm, config))
        else:
            rows, pos, tgt, owner = _answer_logprob_index(batch)
            with torch.no_grad(), vlm.trace(batch):
                if vision is not None:
                    vlm.vision.root.skip(vision.tiled(k))
                apply(vlm, batch, chunk, k, b)
                token_lp = vlm.lm_head.output[rows, pos].float().log_softmax(-1)[torch.arange(len(tgt)), tgt].save()
            sums = torch.zeros(len(batch)).index_add_(0, owner, token_lp.cpu())
            out += sums.tolist()
        bar.update(k)
    bar.close()
    return out


def _rows(chunk_index: int, b: int, k: int) -> Tensor:
    sel = torch.zeros(k * b, dtype=torch.bool)
    sel[chunk_index * b : (chunk_index + 1) * b] = True
    return sel


def _sweep_frame(
    vlm: Any,
    batch: Batch,
    answers: Sequence[str] | None,
    layers: Sequence[int],
    apply: Apply,
    *,
    level: str,
    intervention: str,
    max_new_tokens: int,
    grader: Grader,
    max_rows: int,
    reuse_vision: bool,
    progress: bool,
    config: Any,
) -> tuple[pd.DataFrame, Any]:
    if level not in ("answer", "logprob"):
        raise InputError(f"level must be 'answer' or 'logprob'; got {level!r}.")
    n = len(batch)
    if level == "answer" and answers is None and callable(grader):
        raise InputError("level='answer' needs gold answers to grade against (answers=[...]) or per-sample graders.")
    config = config or greedy_config(vlm, max_new_tokens)
    mine = shard_indices(n)
    rows: list[dict[str, Any]] = []
    if mine:
        part = batch[mine]
        variants = [-1] + list(layers)  # -1: the unablated baseline, in the same batched runs

        def apply_chunk(vlm: Any, batch: Batch, chunk: Sequence[int], k: int, b: int) -> None:
            apply(vlm, batch, [(i, layer) for i, layer in enumerate(chunk) if layer >= 0], k, b)

        values = run_variants(vlm, part, variants, apply_chunk, level=level, config=config, max_rows=max_rows,
                              reuse_vision=reuse_vision, progress=progress, desc=intervention)
        b = len(part)
        for v, layer in enumerate(variants):
            for s in range(b):
                value = values[v * b + s]
                row = {"sample": mine[s], "layer": layer, "unified_layer": layer + 1, "intervention": intervention,
                       "level": level}
                if level == "answer":
                    gold = answers[mine[s]] if answers is not None else None
                    row.update(answer=value, gold=None if gold is None else str(gold),
                               correct=apply_grader(grader, mine[s], value, gold))
                else:
                    row["logprob"] = float(value)
                rows.append(row)
    return gather_frame(pd.DataFrame(rows), sort=["layer", "sample"]), config


def layer_ablation_sweep(
    vlm: Any,
    batch: Batch,
    answers: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    level: str = "answer",
    max_new_tokens: int = 8,
    grader: Grader = exact_match,
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
    generation_config: Any = None,
) -> AblationResult:
    """Make each decoder layer the identity in turn and measure the answer.

    Args:
        batch: the prompts (with teacher-forced ``answers`` for ``level="logprob"``).
        answers: gold answers for ``level="answer"``.
        layers: 0-based decoder layers (default all).
        level: ``"answer"`` (greedy generation, graded) or ``"logprob"`` (log p(gold answer)).
    """
    layers = list(range(vlm.n_layers)) if layers is None else list(layers)
    for layer in layers:
        vlm.layers[layer]

    def apply(vlm: Any, batch: Batch, chosen: Sequence[tuple[int, int]], k: int, b: int) -> None:
        for i, layer in sorted(chosen, key=lambda c: c[1]):
            sites = vlm.layers[layer]
            identity = sites.input  # read the input before the output (execution order)
            output = sites.output
            rows = _rows(i, b, k).to(output.device)
            sites.output = torch.where(rows[:, None, None], identity, output)

    frame, config = _sweep_frame(vlm, batch, answers, layers, apply, level=level, intervention="skip layer",
                                 max_new_tokens=max_new_tokens, grader=grader, max_rows=max_rows,
                                 reuse_vision=reuse_vision, progress=progress, config=generation_config)
    return AblationResult(frame, {"analysis": "layer_ablation", "intervention": "skip layer", "level": level,
                                  "layers": layers, "generation": config_record(config)})


def _query_mask(batch: Batch, spec: PositionSpec, total: int, vlm: Any) -> Tensor:
    """Query positions over ``total`` columns; ``"generated"`` = the last prompt position onward."""
    mask = torch.zeros(len(batch), total, dtype=torch.bool)
    if spec == "generated":
        for r, layout in enumerate(batch.layout):
            mask[r, layout.spans["last_prompt"][0]:] = True
        return mask
    mask[:, : batch.width] = resolve_positions(batch, spec, vlm=vlm, what="knockout queries")
    return mask


def knockout_sweep(
    vlm: Any,
    batch: Batch,
    answers: Sequence[str] | None = None,
    *,
    queries: PositionSpec = "generated",
    keys: PositionSpec = "vision",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    level: str = "logprob",
    max_new_tokens: int = 8,
    grader: Grader = exact_match,
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
    generation_config: Any = None,
) -> AblationResult:
    """Block attention from ``queries`` to ``keys`` in one layer at a time and measure the answer.

    ``queries="generated"`` means the last prompt position and every answer/generated token
    (the positions that predict the answer); ``keys="vision"`` the image tokens.
    """
    layers = list(range(vlm.n_layers)) if layers is None else list(layers)
    for layer in layers:
        if vlm.layers[layer].is_cross_attention:
            raise InputError(f"Layer {layer} is a cross-attention layer; knockout_sweep covers self-attention layers.")
    total = batch.width + (max_new_tokens if level == "answer" else 0)
    q_base = _query_mask(batch, queries, total, vlm)
    k_base = torch.zeros(len(batch), total, dtype=torch.bool)
    k_base[:, : batch.width] = resolve_positions(batch, keys, vlm=vlm, what="knockout keys")

    mine = shard_indices(len(batch))  # the rows this process handles
    q_mine, k_mine = q_base[mine], k_base[mine]

    def apply(vlm: Any, batch_k: Batch, chosen: Sequence[tuple[int, int]], k: int, b: int) -> None:
        keys_k = k_mine.repeat(k, 1)
        for i, layer in sorted(chosen, key=lambda c: c[1]):
            q = q_mine.repeat(k, 1) & _rows(i, b, k)[:, None]
            knockout(vlm, layer, q, keys_k, heads=heads)

    label = f"knockout {positions_label(queries)} <- {positions_label(keys)}"
    frame, config = _sweep_frame(vlm, batch, answers, layers, apply, level=level, intervention=label,
                                 max_new_tokens=max_new_tokens, grader=grader, max_rows=max_rows,
                                 reuse_vision=reuse_vision, progress=progress, config=generation_config)
    return AblationResult(frame, {"analysis": "knockout", "intervention": label, "level": level, "layers": layers,
                                  "heads": list(heads) if heads is not None else None,
                                  "generation": config_record(config)})
