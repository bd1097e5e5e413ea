"""Vision-token swap localization: where does the model stop reading the image?

For each start layer ``L`` the target image's vision-token keys and values are replaced by
the source image's, in every layer from ``L`` on (``mode="from"``, the published probe) or in
layer ``L`` only (``mode="only"``), at prefill; then the model answers greedily. If the answer
still changes when the swap starts late, the image is still being read there.

Unlike the published code, the swap is applied once, at prefill (it re-applied it at every
decode step, appending duplicate source keys to the cache). Each start layer is a variant of
the engine (:mod:`vlm_probe.analyses.engine`): the vision tower runs once per image, layers
below L are replayed from the unswapped run, "from L" swaps go straight into a copy of the
unswapped run's KV cache (only the text after the image is rerun, from layer L up), and the
answers of many start layers are decoded as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from ..errors import InputError
from ..interventions.attention import check_swap_pair
from ..interventions.objects import SwapKV
from ..model.inputs import Batch, align
from ..results import Result
from ..stats import bootstrap
from .engine import Greedy, Source, Variant, run
from .generation import Grader, apply_grader, config_record, eos_ids, exact_match, greedy_config
from .options import RunOptions
from .parallel import gather_frame, shard_indices


class SwapResult(Result):
    """Per (sample, start layer) answers of the vision-token swap, and per-layer rates.

    Columns: ``sample``, ``layer`` (0-based start layer), ``unified_layer``, ``mode``,
    ``answer``, ``baseline`` (the unswapped answer), ``target_answer``, ``source_answer``,
    ``changed``, ``flipped_to_source``, ``target_correct``.
    """

    kind = "vision_swap"

    RATES = ("changed", "flipped_to_source", "target_correct")

    def rates(self, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Per start layer: change rate, flip-to-source rate, target accuracy, with 95% bootstrap CIs."""
        rows = []
        for layer, part in self.frame.groupby("layer", sort=True):
            row: dict[str, Any] = {"layer": layer, "unified_layer": layer + 1, "n": len(part)}
            for rate in self.RATES:
                est = bootstrap(part[rate].astype(float).to_numpy(), n_resamples=n_resamples, seed=seed)
                row.update({rate: est.value, f"{rate}_low": est.low, f"{rate}_high": est.high})
            rows.append(row)
        return pd.DataFrame(rows)

    def transition_layer(self, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The start layer where the change rate drops most relative to starting one layer earlier.

        Returns ``{"layer": L, "drop": ..., "low": ..., "high": ...}`` where ``low``/``high``
        bound the layer over bootstrap resamples of the samples (95%).
        """
        table = self.frame.pivot_table(index="sample", columns="layer", values="changed", aggfunc="mean")
        layers = np.asarray(table.columns)
        values = table.to_numpy(dtype=float)
        if len(layers) < 2:
            raise InputError("The transition layer needs at least two start layers.")

        def pick(rates: np.ndarray) -> tuple[int, float]:
            drops = rates[:-1] - rates[1:]
            i = int(np.argmax(drops))
            return int(layers[i + 1]), float(drops[i])

        layer, drop = pick(values.mean(0))
        rng = np.random.default_rng(seed)
        picks = [pick(values[rng.integers(0, len(values), len(values))].mean(0))[0] for _ in range(n_resamples)]
        low, high = np.quantile(picks, [0.025, 0.975])
        return {"layer": layer, "unified_layer": layer + 1, "drop": drop, "low": int(low), "high": int(high)}

    def plot(self, **kwargs: Any) -> go.Figure:
        rates = self.rates(n_resamples=500)
        fig = go.Figure()
        for rate in self.RATES:
            x = list(rates["unified_layer"])
            fig.add_trace(go.Scatter(x=x, y=rates[rate], mode="lines+markers", name=rate.replace("_", " ")))
            fig.add_trace(go.Scatter(x=x + x[::-1], y=list(rates[f"{rate}_high"]) + list(rates[f"{rate}_low"])[::-1],
                                     fill="toself", opacity=0.15, line={"width": 0}, showlegend=False,
                                     hoverinfo="skip"))
        if len(rates) > 1:
            t = self.transition_layer(n_resamples=200)
            fig.add_vline(x=t["unified_layer"], line_dash="dot",
                          annotation_text=f"transition L{t['unified_layer']}")
        mode = self.meta.get("mode", "from")
        fig.update_layout(title=kwargs.get("title", f"Vision-token KV swap (mode: {mode} layer L)"),
                          xaxis_title="start layer L (unified index)", yaxis_title="rate",
                          template="plotly_white", height=420, yaxis_range=[0, 1])
        return fig


def _swap_layers(start: int, n_layers: int, mode: str) -> range:
    return range(start, n_layers) if mode == "from" else range(start, start + 1)


def vision_swap_sweep(
    vlm: Any,
    targets: Batch,
    sources: Batch,
    *,
    target_answers: Sequence[str] | None = None,
    source_answers: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    mode: str = "from",
    grader: Grader = exact_match,
    source_grader: Grader | None = None,
    options: RunOptions | None = None,
    **legacy: Any,
) -> SwapResult:
    """Run the vision-token swap for every start layer and grade the answers.

    Args:
        targets: what the model sees: prompts with the target images.
        sources: the same prompts with same-size source images (one vision-token count per
            row), which supply the keys/values.
        target_answers: gold answers for the target images.
        source_answers: gold answers for the source images.
        layers: start layers (0-based decoder indices; default all; negative ones count from the end).
        mode: ``"from"`` (layers L..N-1, the published probe) or ``"only"`` (layer L).
        grader: ``grader(prediction, gold) -> bool``, or one ``grader(prediction)`` per sample
            (judging against the target image's answer).
        source_grader: how to judge an answer against the source image's answer (the
            flip-to-source rate); default: ``grader`` when it is one shared callable. Needed
            when ``grader`` is per sample.
        options: :class:`~vlm_probe.analyses.RunOptions`; ``max_new_tokens=``, ``max_rows=``,
            ``reuse_vision=``, ``progress=``, ``generation_config=`` still work.

    Each start layer is one variant (a :class:`~vlm_probe.interventions.SwapKV`). In
    ``mode="from"`` the layers below L are shared with the unswapped run and the swap goes
    into the KV cache, so each start layer reruns only the text after the image from layer L
    up; the answers of every start layer are decoded in one batch.
    """
    options = RunOptions.resolve(options, legacy, "vision_swap_sweep")
    if mode not in ("from", "only"):
        raise InputError(f"mode must be 'from' or 'only'; got {mode!r}.")
    if source_grader is None:
        if not callable(grader):
            raise InputError("grader is one callable per sample (judging the target's answer), so the "
                             "flip-to-source rate needs source_grader: one callable per sample for the "
                             "source image's answer.")
        source_grader = grader
    check_swap_pair(targets, sources)
    vlm.require_image_positions("the vision key/value swap")
    chosen = sorted(vlm.layer_indices(layers))
    n = len(targets)
    target_answers = list(target_answers) if target_answers is not None else [None] * n
    source_answers = list(source_answers) if source_answers is not None else [None] * n
    config = options.generation_config or greedy_config(vlm, options.max_new_tokens)
    mine = shard_indices(n, options.backend)
    rows: list[dict[str, Any]] = []
    if mine:
        tgt, src = targets[mine], sources[mine]
        variants = [Variant(())] + [Variant((SwapKV(tuple(_swap_layers(start, vlm.n_layers, mode))),))
                                    for start in chosen]
        out = run(vlm, tgt, variants, Greedy(config, frozenset(eos_ids(vlm, config))),
                  sources={"source": Source(vlm, src)}, options=options, desc="vision swap")
        baseline = [g.text for g in out.outputs[0]]
        for start, variant, answers in zip(chosen, variants[1:], out.outputs[1:]):
            text = variant.to_json()
            for s, sample in enumerate(mine):
                answer = answers[s].text
                t_gold, s_gold = target_answers[sample], source_answers[sample]
                rows.append({
                    "sample": sample,
                    "layer": start,
                    "unified_layer": start + 1,
                    "mode": mode,
                    "answer": answer,
                    "baseline": baseline[s],
                    "target_answer": t_gold,
                    "source_answer": s_gold,
                    "changed": answer != baseline[s],
                    "flipped_to_source": apply_grader(source_grader, sample, answer, s_gold),
                    "target_correct": apply_grader(grader, sample, answer, t_gold),
                    "variant": text,
                })
    frame = gather_frame(pd.DataFrame(rows), sort=["layer", "sample"], parallel=options.backend)
    return SwapResult(frame, {"analysis": "vision_swap", "mode": mode, "layers": chosen,
                              "generation": config_record(config), "n_samples": n, "options": options.record()})


def swap_pairs(vlm: Any, pairs: Sequence[Any]) -> tuple[Batch, Batch, list[str], list[str]]:
    """Prepare target and source batches from swap pairs (dicts or objects with ``prompt``,
    ``target_image``, ``source_image`` as PIL images, ``target_answer``, ``source_answer``)."""

    def get(item: Any, key: str) -> Any:
        return item[key] if isinstance(item, dict) else getattr(item, key)

    prompts = [get(p, "prompt") for p in pairs]
    targets = vlm.prepare(prompts, [[get(p, "target_image")] for p in pairs])
    sources = vlm.prepare(prompts, [[get(p, "source_image")] for p in pairs])
    targets, sources = align(targets, sources)
    return targets, sources, [get(p, "target_answer") for p in pairs], [get(p, "source_answer") for p in pairs]
