"""Vision-token swap localization: where does the model stop reading the image?

For each start layer ``L`` the target image's vision-token keys and values are replaced by
the source image's, in every layer from ``L`` on (``mode="from"``, the published probe) or in
layer ``L`` only (``mode="only"``), at prefill; then the model answers greedily. If the answer
still changes when the swap starts late, the image is still being read there.

Unlike the published code, the swap is applied once, at prefill (it re-applied it at every
decode step, appending duplicate source keys to the cache). Many start layers run as one
batched generation, and the vision tower runs once per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..interventions.attention import check_swap_pair, vision_kv
from ..interventions import sites as site_ops
from ..model.inputs import Batch, align
from ..results import Result
from ..stats import bootstrap
from .batched import capture, chunks, repeat_rows
from .generation import (
    config_record,
    decode_new,
    eos_ids,
    Grader,
    apply_grader,
    exact_match,
    generate_texts,
    generation_defaults,
    greedy_config,
)
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
    max_new_tokens: int = 8,
    grader: Grader = exact_match,
    source_grader: Grader | None = None,
    max_rows: int = 64,
    reuse_vision: bool = True,
    progress: bool = True,
    generation_config: Any = None,
) -> SwapResult:
    """Run the vision-token swap for every start layer and grade the answers.

    Args:
        targets: what the model sees: prompts with the target images.
        sources: the same prompts with same-size source images (one vision-token count per
            row), which supply the keys/values.
        target_answers: gold answers for the target images.
        source_answers: gold answers for the source images.
        layers: start layers (0-based decoder indices; default all).
        mode: ``"from"`` (layers L..N-1, the published probe) or ``"only"`` (layer L).
        grader: ``grader(prediction, gold) -> bool``, or one ``grader(prediction)`` per sample
            (judging against the target image's answer).
        source_grader: how to judge an answer against the source image's answer (the
            flip-to-source rate); default: ``grader`` when it is one shared callable. Needed
            when ``grader`` is per sample.
    """
    if mode not in ("from", "only"):
        raise InputError(f"mode must be 'from' or 'only'; got {mode!r}.")
    if source_grader is None:
        if not callable(grader):
            raise InputError("grader is one callable per sample (judging the target's answer), so the "
                             "flip-to-source rate needs source_grader: one callable per sample for the "
                             "source image's answer.")
        source_grader = grader
    check_swap_pair(targets, sources)
    layers = list(range(vlm.n_layers)) if layers is None else sorted(layers)
    for layer in layers:
        vlm.layers[layer]
    n = len(targets)
    target_answers = list(target_answers) if target_answers is not None else [None] * n
    source_answers = list(source_answers) if source_answers is not None else [None] * n
    config = generation_config or greedy_config(vlm, max_new_tokens)
    mine = shard_indices(n)
    rows: list[dict[str, Any]] = []
    if mine:
        tgt, src = targets[mine], sources[mine]
        needed = sorted({l for start in layers for l in _swap_layers(start, vlm.n_layers, mode)})
        kv = vision_kv(vlm, src, needed)
        baseline = generate_texts(vlm, tgt, config)
        vision = capture(vlm, tgt, vision=True).vision if reuse_vision else None
        b = len(tgt)
        per_chunk = max(1, max_rows // b)
        bar = tqdm(total=len(layers), desc="vision swap", unit="layer", disable=not progress)
        for chunk in chunks(layers, per_chunk):
            k = len(chunk)
            batch = repeat_rows(tgt, k)
            vis_mask = batch.layout.mask("vision")
            with torch.no_grad(), generation_defaults(vlm.hf, config), vlm.generate(batch, generation_config=config) as tracer:
                if vision is not None:
                    vlm.vision.root.skip(vision.tiled(k))
                for layer in needed:
                    covered = [i for i, start in enumerate(chunk) if layer in _swap_layers(start, vlm.n_layers, mode)]
                    if not covered:
                        continue
                    rows_sel = torch.zeros(k * b, dtype=torch.bool)
                    for i in covered:
                        rows_sel[i * b : (i + 1) * b] = True
                    mask = vis_mask & rows_sel[:, None]
                    src_k, src_v = kv[layer]
                    site_ops.edit(vlm, "k", layer, batch, mask, torch.cat([src_k] * len(covered)))
                    site_ops.edit(vlm, "v", layer, batch, mask, torch.cat([src_v] * len(covered)))
                ids = tracer.result.save()
            answers = decode_new(vlm, ids, batch.width, eos_ids(vlm, config))
            for i, start in enumerate(chunk):
                for s in range(b):
                    answer = answers[i * b + s]
                    t_gold, s_gold = target_answers[mine[s]], source_answers[mine[s]]
                    rows.append({
                        "sample": mine[s],
                        "layer": start,
                        "unified_layer": start + 1,
                        "mode": mode,
                        "answer": answer,
                        "baseline": baseline[s],
                        "target_answer": t_gold,
                        "source_answer": s_gold,
                        "changed": answer != baseline[s],
                        "flipped_to_source": apply_grader(source_grader, mine[s], answer, s_gold),
                        "target_correct": apply_grader(grader, mine[s], answer, t_gold),
                    })
            bar.update(k)
        bar.close()
    frame = gather_frame(pd.DataFrame(rows), sort=["layer", "sample"])
    return SwapResult(frame, {"analysis": "vision_swap", "mode": mode, "layers": layers,
                              "generation": config_record(config), "n_samples": n})


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
