"""Layer ablation and attention knockout sweeps.

``layer_ablation_sweep`` makes one decoder layer the identity at a time (the published
reasoning-localization probe) and measures the effect on the answer: greedy answers graded
against gold (``level="answer"``) or the teacher-forced log-probability of the gold answer
(``level="logprob"``). ``knockout_sweep`` blocks attention edges from a query group to a key
group (e.g. answer <- vision) one layer at a time, with the same two levels.

Both are thin builders of variants (one :class:`~vlm_probe.interventions.Skip` or
:class:`~vlm_probe.interventions.Knockout` per layer) for the engine
(:mod:`vlm_probe.analyses.engine`): many layers per batched forward or generation, the
vision tower once, layers below the ablated one replayed, and a knockout of the generated
tokens reruns only the last prompt column over the unablated run's KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from ..errors import InputError
from ..interventions.objects import Knockout, Skip
from ..interventions.positions import PositionSpec, column_mask, positions_label
from ..model.inputs import Batch
from ..results import Result
from ..stats import bootstrap, paired_difference
from .engine import AnswerLogprob, Greedy, Variant, run
from .generation import Grader, apply_grader, config_record, eos_ids, exact_match, greedy_config
from .options import RunOptions
from .parallel import gather_frame, shard_indices


class AblationResult(Result):
    """Per (sample, layer) outcome of an ablation or knockout sweep.

    Columns: ``sample``, ``layer`` (0-based; -1 is the unablated baseline), ``unified_layer``,
    ``intervention``, ``level``, ``variant`` (the interventions as JSON), and ``answer``/``correct``
    (answer level) or ``logprob`` (log-probability of the gold answer, logprob level).
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
            unified = int(part["unified_layer"].iloc[0])
            part = part.set_index("sample")[col].astype(float)
            est = bootstrap(part.to_numpy(), n_resamples=n_resamples, seed=seed)
            diff = paired_difference(base.loc[part.index].to_numpy(), part.to_numpy(), n_resamples=n_resamples,
                                     seed=seed)
            rows.append({"layer": layer, "unified_layer": unified, "value": est.value, "low": est.low,
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


# ----------------------------------------------------------------------------- sweeps


def _shard_spec(spec: PositionSpec, mine: list[int]) -> PositionSpec:
    """A position spec for this process's rows (masks are cut to them)."""
    return spec[mine] if isinstance(spec, Tensor) and spec.dtype == torch.bool else spec


def _sweep_frame(
    vlm: Any,
    batch: Batch,
    answers: Sequence[str] | None,
    build: Callable[[list[int]], list[tuple[int, Variant]]],
    *,
    level: str,
    intervention: str,
    grader: Grader,
    options: RunOptions,
) -> tuple[pd.DataFrame, Any]:
    """Run the unablated baseline (layer -1) and every variant; one row per (layer, sample)."""
    if level not in ("answer", "logprob"):
        raise InputError(f"level must be 'answer' or 'logprob'; got {level!r}.")
    n = len(batch)
    if level == "answer" and answers is None and callable(grader):
        raise InputError("level='answer' needs gold answers to grade against (answers=[...]) or per-sample graders.")
    config = options.generation_config or greedy_config(vlm, options.max_new_tokens)
    readout = Greedy(config, frozenset(eos_ids(vlm, config))) if level == "answer" else AnswerLogprob()
    mine = shard_indices(n, options.backend)
    rows: list[dict[str, Any]] = []
    if mine:
        part = batch[mine]
        variants = [(-1, Variant(()))] + build(mine)
        out = run(vlm, part, [v for _, v in variants], readout, options=options, desc=intervention)
        for (layer, variant), values in zip(variants, out.outputs):
            text = variant.to_json()
            for s, sample in enumerate(mine):
                row = {"sample": sample, "layer": layer, "unified_layer": layer + 1 if layer >= 0 else 0,
                       "intervention": intervention, "level": level, "variant": text}
                if level == "answer":
                    answer = values[s].text
                    gold = answers[sample] if answers is not None else None
                    row.update(answer=answer, gold=None if gold is None else str(gold),
                               correct=apply_grader(grader, sample, answer, gold))
                else:
                    row["logprob"] = float(values[s])
                rows.append(row)
    return gather_frame(pd.DataFrame(rows), sort=["layer", "sample"], parallel=options.backend), config


def layer_ablation_sweep(
    vlm: Any,
    batch: Batch,
    answers: Sequence[str] | None = None,
    *,
    layers: Sequence[int] | None = None,
    level: str = "answer",
    grader: Grader = exact_match,
    site: str = "layer_out",
    options: RunOptions | None = None,
    **legacy: Any,
) -> AblationResult:
    """Make each decoder layer (or vision block, ``site="vision_out"``) the identity in turn
    and measure the answer.

    Args:
        batch: the prompts (with teacher-forced ``answers`` for ``level="logprob"``).
        answers: gold answers for ``level="answer"``.
        layers: 0-based decoder layers or vision blocks (default all; negative ones count from the end).
        level: ``"answer"`` (greedy generation, graded) or ``"logprob"`` (log p(gold answer)).
        options: :class:`~vlm_probe.analyses.RunOptions`; ``max_new_tokens=``, ``max_rows=``,
            ``reuse_vision=``, ``progress=``, ``generation_config=`` still work.
    """
    options = RunOptions.resolve(options, legacy, "layer_ablation_sweep")
    if site not in ("layer_out", "vision_out"):
        raise InputError(f"layer_ablation_sweep skips decoder layers (site='layer_out') or vision blocks "
                         f"(site='vision_out'); got {site!r}.")
    chosen = vlm.layer_indices(layers, "decoder" if site == "layer_out" else "vision")
    label = "skip layer" if site == "layer_out" else "skip vision block"

    def build(mine: list[int]) -> list[tuple[int, Variant]]:
        return [(layer, Variant((Skip(layer, site),))) for layer in chosen]

    frame, config = _sweep_frame(vlm, batch, answers, build, level=level, intervention=label, grader=grader,
                                 options=options)
    if site == "vision_out":
        frame.loc[frame["layer"] >= 0, "unified_layer"] = frame.loc[frame["layer"] >= 0, "layer"] - vlm.vision.depth
    return AblationResult(frame, {"analysis": "layer_ablation", "intervention": label, "level": level,
                                  "layers": chosen, "site": site, "generation": config_record(config),
                                  "options": options.record()})


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
    grader: Grader = exact_match,
    options: RunOptions | None = None,
    **legacy: Any,
) -> AblationResult:
    """Block attention from ``queries`` to ``keys`` in one layer at a time and measure the answer.

    ``queries="generated"`` means the last prompt position and every answer/generated token
    (the positions that predict the answer); ``keys="vision"`` the image tokens. Positions
    are absolute columns found from the cache layout at every step, so sliding-window layers
    are edited correctly during generation.
    """
    options = RunOptions.resolve(options, legacy, "knockout_sweep")
    chosen = vlm.layer_indices(layers)
    for layer in chosen:
        if vlm.layers[layer].is_cross_attention:
            raise InputError(f"Layer {layer} is a cross-attention layer; knockout_sweep covers self-attention layers.")
    for spec, what in ((queries, "knockout_sweep queries"), (keys, "knockout_sweep keys")):
        column_mask(batch, spec, torch.arange(batch.width), vlm=vlm, what=what)  # fail before any forward
    heads_t = None if heads is None else tuple(int(h) for h in heads)
    label = f"knockout {positions_label(queries)} <- {positions_label(keys)}"

    def build(mine: list[int]) -> list[tuple[int, Variant]]:
        q, k = _shard_spec(queries, mine), _shard_spec(keys, mine)
        return [(layer, Variant((Knockout(layer, q, k, heads_t),))) for layer in chosen]

    frame, config = _sweep_frame(vlm, batch, answers, build, level=level, intervention=label, grader=grader,
                                 options=options)
    return AblationResult(frame, {"analysis": "knockout", "intervention": label, "level": level, "layers": chosen,
                                  "heads": list(heads) if heads is not None else None,
                                  "generation": config_record(config), "options": options.record()})
