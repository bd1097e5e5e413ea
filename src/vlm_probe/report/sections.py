"""The analysis sections of the main job: each runs analyses from ``vlm_probe`` and saves tables.

A section function takes the :class:`~.pipeline.Pipeline` and its :class:`~.pipeline.SectionRecord`,
raises :class:`~.pipeline.Skip` when the data cannot carry it, records its sample sizes, and
saves every table the report draws and the claims judge. It draws and judges nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stats import bootstrap
from .estimators import restored_by_layer
from .pipeline import Pipeline, SectionRecord, Skip

#: Columns of the per-tensor weight table (the spectra go to ``weights_spectra``).
TENSOR_COLUMNS = ("step", "tensor", "layer", "label", "region", "component", "numel", "energy", "frob",
                  "weight_norm", "rel_norm", "spectral_norm", "stable_rank", "erank_s", "svd_mode")


def weights(p: Pipeline, rec: SectionRecord) -> None:
    from ..weights import compare_weights

    result = compare_weights(dict(p.inputs.checkpoints), cuts=p.cuts.as_tuple(), svd="auto", top_k=16, quiet=True)
    frame = result.frame
    p.save_table(rec, "weights_tensors", frame[[c for c in TENSOR_COLUMNS if c in frame]])
    p.save_table(rec, "weights_by_layer", result.by_layer())
    p.save_table(rec, "weights_by_region", result.by_region())
    rows = []
    with_spectra = frame[frame["spectrum"].map(lambda s: s is not None and len(s) > 0)]
    for (step, component), part in with_spectra.groupby(["step", "component"], sort=True):
        length = max(len(s) for s in part["spectrum"])
        stack = np.full((len(part), length), np.nan)
        for r, values in enumerate(part["spectrum"]):
            stack[r, : len(values)] = np.asarray(values, dtype=float)
        for i, value in enumerate(np.nanmean(stack, axis=0), start=1):
            rows.append({"step": step, "component": component, "i": i, "value": float(value), "n_tensors": len(part)})
    p.save_table(rec, "weights_spectra", pd.DataFrame(rows))
    steps = list(dict.fromkeys(frame["step"]))
    modes = frame[frame["step"] == steps[-1]]["svd_mode"].value_counts().to_dict()
    spectra = ", ".join(f"{n} {'without (vectors)' if mode == 'none' else mode}" for mode, n in modes.items())
    rec.samples.append(f"every tensor: {frame['tensor'].nunique()} per step ({', '.join(steps)}); spectra: {spectra}")


def swap(p: Pipeline, rec: SectionRecord) -> None:
    from ..evaluation.probes import swap_localization

    p.need("swap", what="The vision-token swap")
    pairs = p.sample("swap", p.options.samples)
    rec.samples.append(p.described(pairs, "swap pairs", "swap"))
    frames = []
    for name in ("IN", "RL"):
        result = swap_localization(p.models[name], pairs, fmt=p.fmt(), max_new_tokens=p.max_new_tokens,
                                   max_rows=p.options.max_rows, progress=False)
        p.save_table(rec, f"swap_{name}", result.frame.assign(model=name))
        frames.append(result.rates(n_resamples=p.options.claims.n_resamples).assign(model=name))
    p.save_table(rec, "swap_rates", pd.concat(frames, ignore_index=True))


def ablation(p: Pipeline, rec: SectionRecord) -> None:
    from ..evaluation.probes import ablation_localization

    p.need("reasoning", "math", what="Layer ablation (graded answers)")
    key = "reasoning" if p.dataset("reasoning") is not None and len(p.dataset("reasoning")) else "math"
    items = p.sample(key, p.options.samples)
    rec.samples.append(p.described(items, "text reasoning items" if key == "reasoning" else "math VQA items", key))
    frames = []
    for name in ("IN", "RL"):
        result = ablation_localization(p.models[name], items, fmt=p.fmt(), max_new_tokens=p.max_new_tokens,
                                       max_rows=p.options.max_rows, progress=False)
        summary = result.summary(n_resamples=p.options.claims.n_resamples)
        unablated = result.frame[result.frame["layer"] == -1][result.value_column].astype(float).to_numpy()
        base = bootstrap(unablated, n_resamples=p.options.claims.n_resamples)
        frames.append(summary.assign(model=name, baseline=base.value, baseline_low=base.low, baseline_high=base.high))
    p.save_table(rec, "ablation", pd.concat(frames, ignore_index=True))


def cross_patching(p: Pipeline, rec: SectionRecord) -> None:
    from ..analyses import cross_checkpoint_sweep, layer_increments
    from ..analyses import metrics as M
    from ..analyses.patching import PatchingResult

    requests = p.section_prompts(rec, "Cross-checkpoint patching", images=False)
    frames = []
    for offset, batch in p.batches(requests):
        # KL(RL || patched IN) and the reverse, per prompt and layer: the claims and the curves
        # take a ratio of means over prompts from it (stable where single KLs are tiny)
        result = cross_checkpoint_sweep(p.models, batch, positions="all", metric=M.kl_to_clean(), progress=False,
                                        max_rows=p.options.max_rows)
        frames.append(result.frame.assign(sample=result.frame["sample"] + offset))
    frame = pd.concat(frames, ignore_index=True)
    p.save_table(rec, "cross_patching", frame)
    restored = restored_by_layer(frame, n_resamples=p.options.claims.n_resamples, seed=p.options.claims.seed)
    cumulative = PatchingResult(restored[["receiver", "donor", "layer", "unified_layer"]].assign(
        value=restored["restored"]))
    increments = layer_increments(cumulative, value="value")[["receiver", "donor", "layer", "increment"]]
    p.save_table(rec, "cross_patching_restored", restored.merge(increments, on=["receiver", "donor", "layer"]))


def attention(p: Pipeline, rec: SectionRecord) -> None:
    from ..analyses.attention_mass import AttentionMassResult, attention_mass, token_attention
    from ..analyses.overlay import overlay_checkpoints

    requests = p.section_prompts(rec, "Attention on the image", images=True)
    frames, first = [], None
    for offset, batch in p.batches(requests):
        result = attention_mass(p.models, batch, queries="generated", keys="vision", max_new_tokens=p.max_new_tokens,
                                progress=False)
        per_layer = result.frame.groupby(["checkpoint", "sample", "layer", "unified_layer"], as_index=False)["mass"]
        frames.append(per_layer.mean().assign(sample=lambda f: f["sample"] + offset))
        first = batch[:1] if first is None else first
    frame = pd.concat(frames, ignore_index=True)
    p.save_table(rec, "attention_mass", frame)
    p.save_table(rec, "attention_mass_difference",
                 AttentionMassResult(frame.assign(head=0), {}).difference("IN", "RL"))
    late = range(p.cuts.mid, p.models["IN"].n_layers)  # where on the picture, in the mid and late layers
    values = {name: token_attention(p.models[name], first, queries="last", layers=late) for name in ("IN", "RL")}
    span = f"L{p.cuts.mid + 1}-L{p.models['IN'].n_layers}"
    figures = overlay_checkpoints(first, values)
    titles = {"IN": f"IN: the last prompt token's attention on each image cell<br>(mean over heads, layers {span})",
              "RL - IN": f"RL minus IN: the last prompt token's attention on each image cell<br>(mean over heads, "
                         f"layers {span})"}
    for key, title in titles.items():
        figure = figures[key]
        figure.update_layout(title={"text": title, "font": {"size": 13}}, margin={"t": 80})
        p.save_figure(rec, "attention_overlay_" + key.replace(" ", ""), figure)


def lens(p: Pipeline, rec: SectionRecord) -> None:
    from ..analyses.lens import LensResult, logit_lens

    requests = p.section_prompts(rec, "The logit lens", images=False)
    frames = []
    for offset, batch in p.batches(requests):
        result = logit_lens(p.models, batch, positions="last", transfer=True, progress=False)
        frames.append(result.frame.assign(sample=result.frame["sample"] + offset))
    frame = pd.concat(frames, ignore_index=True)
    keep = ["checkpoint", "readout", "sample", "layer", "unified_layer", "kl_to_final", "top_prob"]
    p.save_table(rec, "logit_lens", LensResult(frame[[c for c in keep if c in frame]]).frame)


def drift(p: Pipeline, rec: SectionRecord) -> None:
    from ..analyses.collect import collect
    from ..analyses.drift import representation_drift
    from ..analyses.probes import probe_layers

    requests = p.section_prompts(rec, "Representation drift", images=False)
    batches = [batch for _, batch in p.batches(requests)]
    groups = ("vision", "question", "last") if any(r.images for r in requests) else ("question", "last")
    frames = [representation_drift(p.models, batch, groups=groups, progress=False).frame.assign(chunk=i,
                                                                                                 n=len(batch))
              for i, batch in enumerate(batches)]
    frame = pd.concat(frames, ignore_index=True)
    keys = ["a", "b", "site", "layer", "unified_layer", "group"]
    weighted = frame.assign(**{m: frame[m] * frame["n"] for m in ("cosine", "rel_norm", "cka")})
    sums = weighted.groupby(keys, as_index=False)[["cosine", "rel_norm", "cka", "n", "n_tokens"]].sum()
    for m in ("cosine", "rel_norm", "cka"):  # averaged over chunks, weighted by prompts
        sums[m] = sums[m] / sums["n"]
    p.save_table(rec, "drift", sums.rename(columns={"n": "n_prompts"}))
    labels = [str(r.answer) for r in requests]
    if len(set(labels)) > 1 and len(labels) >= 8:
        acts = collect(p.models, batches, groups=("last",), reduce="mean", progress=False)
        probes = probe_layers(acts, labels, group="last", seeds=(0, 1, 2, 3, 4), test_size=0.3)
        p.save_table(rec, "probes", probes.frame)
    else:
        rec.notes.append("Linear probes need at least 8 prompts and two distinct answers; skipped.")


def _outcomes(run: Any, conditions: tuple[str, ...], metric: str) -> pd.Series:
    """Per-item outcome of a fine-grained metric (1/0), by id, on the items run under every condition."""
    from ..evaluation.metrics import correctness

    parts = [correctness(run, c) for c in conditions]
    joined = pd.concat(parts, axis=1, join="inner")
    if metric == "M_vis":
        return (joined.iloc[:, 0] & ~joined.iloc[:, 1]).astype(float)
    if metric == "M_v2r":
        return (joined.iloc[:, 0] & joined.iloc[:, 1]).astype(float)
    return joined.iloc[:, 0].astype(float)


def transfer(p: Pipeline, rec: SectionRecord) -> None:
    from ..evaluation.metrics import fine_grained_metrics
    from ..evaluation.runner import evaluate
    from ..evaluation.transfer import transfer_table
    from ..weights.plans import published_variants

    p.need("general", "math", "reasoning", what="The transfer table (graded answers)")
    sets = {"general": ("image", "blank"), "math": ("image", "description"), "reasoning": ("text",)}
    metric_of = {"general": "M_vis", "math": "M_v2r", "reasoning": "M_rea"}
    data = {key: p.sample(key, p.options.eval_items) for key in sets}
    data = {k: v for k, v in data.items() if v is not None}
    names = {"general": "general VQA items", "math": "math VQA items", "reasoning": "text items"}
    rec.samples += [p.described(items, names[key], key) for key, items in data.items()]
    items_rows: list[pd.DataFrame] = []
    accuracies: list[pd.DataFrame] = []

    def score(vlm: Any, variant: str) -> pd.DataFrame:
        runs = {key: evaluate(vlm, items, conditions=list(sets[key]), batch_size=p.chunk,
                              max_new_tokens=p.max_new_tokens, prompt=p.fmt(), quiet=True, name=variant)
                for key, items in data.items()}
        result = fine_grained_metrics(**runs, model=variant, n_resamples=p.options.claims.n_resamples)
        for key, run in runs.items():
            outcome = _outcomes(run, sets[key], metric_of[key])
            items_rows.append(pd.DataFrame({"variant": variant, "metric": metric_of[key], "id": outcome.index,
                                            "value": outcome.to_numpy()}))
        frame = result.frame
        accuracies.append(frame[frame["metric"].str.startswith("accuracy:")][
            ["metric", "value", "low", "high", "n", "population"]].assign(variant=variant))
        return result.metrics()

    plans = published_variants("IN", "RL", cuts=p.cuts.as_tuple(), host=p.options.merge_host)
    checkpoints = {k: v for k, v in p.inputs.checkpoints.items() if k in ("IN", "RL")}
    table = transfer_table(p.models["IN"], checkpoints, plans, host="IN", donor="RL", evaluate=score,
                           progress=False)
    hosts = dict(zip(table.frame["variant"], table.frame["host"]))
    p.save_table(rec, "transfer_table", table.frame)
    items = pd.concat(items_rows, ignore_index=True)
    p.save_table(rec, "transfer_items", items.assign(host=items["variant"].map(hosts)))
    p.save_table(rec, "transfer_accuracies", pd.concat(accuracies, ignore_index=True))


def freezing(p: Pipeline, rec: SectionRecord) -> None:
    testbed = p.inputs.testbed
    if testbed is None:
        raise Skip("Freezing needs RL re-runs with blocks frozen, which only the built-in testbed can do.",
                   "run without --in/--rl (the built-in testbed)")
    from ..testbed.necessity import necessity_table

    table = necessity_table(testbed, quiet=p.options.quiet, n_resamples=p.options.claims.n_resamples)
    p.save_table(rec, "freezing", table.frame)
    counts = table.frame[table.frame["variant"] == "RL"].set_index("family")["n"].to_dict()
    rec.samples.append("n = " + ", ".join(f"{family} {n}" for family, n in counts.items())
                       + " held-out items per variant (graded by the evaluation harness's grader)")


#: ``(id, title, function)`` of every section, in report order.
SECTIONS: tuple[tuple[str, str, Any], ...] = (
    ("weights", "Weight deltas and spectra", weights),
    ("swap", "Vision-token swap localization", swap),
    ("ablation", "Layer-ablation localization", ablation),
    ("cross_patching", "Cross-checkpoint patching", cross_patching),
    ("attention", "Attention of generated tokens on the image", attention),
    ("lens", "Logit lens", lens),
    ("drift", "Representation drift and linear probes", drift),
    ("transfer", "Transfer table: block merges", transfer),
    ("freezing", "Freezing necessity (testbed)", freezing),
)
