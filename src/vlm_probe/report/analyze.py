"""The main job: the whole Frankenstein analysis of an IN/RL pair, and its HTML report.

``analyze(...)`` runs, on one checkpoint pair (the built-in testbed when none is given):

1. weight deltas and spectra (Base->IN->RL or IN->RL),
2. vision-token-swap localization per task (IN and RL),
3. layer-ablation localization on reasoning (IN and RL),
4. cross-checkpoint patching (RL into IN and the reverse),
5. attention mass from generated tokens to vision tokens, IN vs RL,
6. representation drift and linear probes,
7. the transfer table of the six block-merge variants,
8. on the testbed, the freezing-necessity table,

then writes ``out/report.html`` (self-contained), ``out/*.parquet`` tables, ``out/run.json``
(provenance) and a summary of each published claim with the evidence for or against it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_write_json
from ..stats import bootstrap, paired_difference
from .html import Claim, Report, Section

DATA_NAMES = {
    "swap": ("swap.jsonl", "swap_pairs.jsonl"),
    "general": ("perception.jsonl", "general.jsonl"),
    "math": ("v2r.jsonl", "math.jsonl"),
    "reasoning": ("text.jsonl", "reasoning.jsonl"),
}


@dataclass
class Inputs:
    """What the analysis runs on: checkpoints, data files, and the prompt format of the data."""

    checkpoints: dict[str, Path]
    data: dict[str, Path]
    testbed: Any = None
    prompt_format: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    samples: int = 24  #: items per analysis (swap pairs, ablation items, patching prompts, ...)
    eval_items: int = 48  #: items per dataset in the transfer table
    max_new_tokens: int = 8
    cuts: tuple[int, int] | str | None = None  #: where mid and late start (``(8, 20)`` or ``"8,20"``)
    quiet: bool = False
    freezing: bool = True
    load: dict[str, Any] = field(default_factory=dict)  #: ``load()`` options: dtype, device_map, attn_implementation


def find_data(directory: Path) -> dict[str, Path]:
    """The analysis datasets in a folder (swap pairs, general VQA, math VQA, text reasoning)."""
    found = {}
    for key, names in DATA_NAMES.items():
        for name in names:
            if (directory / name).is_file():
                found[key] = directory / name
                break
    if "swap" not in found and any((directory / task / "data.jsonl").is_file() for task in ("counting", "ocr")):
        found["swap"] = directory
    return found


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
    """Check every input before any work: paths, families, one architecture, the cuts; build
    the testbed if needed."""
    from ..weights.regions import Cuts
    from ..weights.reader import open_checkpoint

    testbed = None
    if in_path is None and rl_path is None:
        from ..testbed.build import build_testbed
        from ..testbed.recipe import Recipe

        recipe = Recipe.reduced_size(seed=seed) if reduced else Recipe(seed=seed)
        testbed = build_testbed(recipe, quiet=quiet)
        checkpoints = {name: testbed.checkpoint(name) for name in ("Base", "IN", "RL")}
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
    Cuts.make(cuts, ref.n_layers)  # raises a specific InputError for bad cuts
    files: dict[str, Path] = {}
    if data is not None:
        directory = Path(data)
        if not directory.is_dir():
            raise InputError(f"--data {data}: not a directory.")
        files = find_data(directory)
        if not files:
            raise InputError(f"--data {data} holds none of {sorted(n for v in DATA_NAMES.values() for n in v)}.")
    fmt: dict[str, Any] = {}
    if data is not None and (Path(data) / "manifest.json").is_file():
        fmt = json.loads((Path(data) / "manifest.json").read_text()).get("prompt_format", {}) or {}
    if testbed is not None and not fmt:
        from ..testbed.datasets import PROMPT_FORMAT

        fmt = dict(PROMPT_FORMAT)
    return Inputs({k: Path(v) for k, v in checkpoints.items()}, files, testbed, fmt)


class Analysis:
    """Runs the sections, keeps their tables, and assembles the report."""

    def __init__(self, inputs: Inputs, out: Path, options: Options) -> None:
        self.inputs = inputs
        self.out = out
        self.options = options
        self.sections: list[Section] = []
        self.claims: list[Claim] = []
        self.timings: dict[str, float] = {}
        self.tables: dict[str, pd.DataFrame] = {}
        self.facts: dict[str, Any] = {}
        self._models: Any = None

    # ------------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        if not self.options.quiet:
            print(message, file=sys.stderr)

    @property
    def models(self) -> Any:
        if self._models is None:
            from ..model import load_set

            self._models = load_set(IN=str(self.inputs.checkpoints["IN"]), RL=str(self.inputs.checkpoints["RL"]),
                                    options=self.options.load)
        return self._models

    def fmt(self) -> Any:
        from ..evaluation.conditions import PromptFormat

        values = dict(self.inputs.prompt_format)
        if "blank_color" in values:
            values["blank_color"] = tuple(values["blank_color"])
        return PromptFormat(**values)

    def dataset(self, key: str, limit: int) -> Any:
        from ..evaluation.datasets import load_dataset, load_swap_pairs

        path = self.inputs.data.get(key)
        if path is None:
            return None
        if key == "swap":
            return load_swap_pairs(path, limit=limit)
        return load_dataset(path, limit=limit)

    def save_table(self, name: str, frame: pd.DataFrame) -> None:
        self.tables[name] = frame
        frame.to_parquet(self.out / f"{name}.parquet", index=False)

    def run(self, name: str, title: str, fn: Callable[[Section], None]) -> None:
        section = Section(id=name, title=title)
        start = time.perf_counter()
        self.log(f"[vlm-probe] {title} ...")
        try:
            fn(section)
        except Exception as error:  # a failed section is reported, the rest of the analysis goes on
            section.notes.append(f"This analysis failed: {type(error).__name__}: {error}")
            self.facts.setdefault("failures", {})[name] = f"{type(error).__name__}: {error}"
        self.timings[name] = time.perf_counter() - start
        self.sections.append(section)

    def n_layers(self) -> int:
        return self.models["IN"].n_layers

    def cuts(self) -> tuple[int, int]:
        from ..weights.regions import Cuts

        c = Cuts.make(self.options.cuts, self.n_layers())
        return (c.mid, c.late)

    # ------------------------------------------------------------------ sections

    def weights(self, section: Section) -> None:
        from ..weights import compare_weights

        result = compare_weights({k: v for k, v in self.inputs.checkpoints.items()}, cuts=self.options.cuts,
                                 svd="auto", top_k=16, quiet=True)
        regions = result.by_region()
        self.save_table("weights_by_region", regions)
        self.save_table("weights_by_layer", result.by_layer())
        section.figures += [result.plot("layers", metric="rel_norm"), result.plot("regions"),
                            result.plot("spectra"), result.plot("layers", metric="stable_rank_mean")]
        section.tables.append(("Energy share and relative norm by region", result.summary()))
        frame = result.frame
        rl = frame[frame["step"] == "IN->RL"]
        llm = rl[rl["region"].isin(["early", "mid", "late"])]
        energy = llm.groupby("region")["energy"].sum()
        params = llm.groupby("region")["numel"].sum()
        e_ml = float(energy.get("mid", 0) + energy.get("late", 0)) / max(float(energy.sum()), 1e-30)
        p_ml = float(params.get("mid", 0) + params.get("late", 0)) / max(float(params.sum()), 1)
        self.facts["weights"] = {"rl_mid_late_energy_share": e_ml, "mid_late_param_share": p_ml}
        section.reading = (
            f"RL's update puts {100 * e_ml:.0f}% of its LLM energy (squared delta norm) in the mid and late thirds, "
            f"which hold {100 * p_ml:.0f}% of the LLM parameters."
        )
        if "Base->IN" in set(frame["step"]):
            sft = frame[(frame["step"] == "Base->IN") & frame["region"].isin(["early", "mid", "late"])]
            ratio = float(rl["energy"].sum()) / max(float(frame[frame["step"] == "Base->IN"]["energy"].sum()), 1e-30)
            self.facts["weights"]["rl_over_sft_energy"] = ratio
            sft_e = sft.groupby("region")["energy"].sum()
            sft_ml = float(sft_e.get("mid", 0) + sft_e.get("late", 0)) / max(float(sft_e.sum()), 1e-30)
            section.reading += (f" The supervised update (Base->IN) puts {100 * sft_ml:.0f}% there; RL's whole update "
                                f"has {ratio:.2g}x the SFT update's energy.")

    def swap(self, section: Section) -> None:
        from ..evaluation.probes import swap_localization

        pairs = self.dataset("swap", self.options.samples)
        if pairs is None or not len(pairs):
            section.reading = "No swap pairs in --data; this probe was skipped."
            return
        frames, transitions = [], {}
        for name in ("IN", "RL"):
            result = swap_localization(self.models[name], pairs, fmt=self.fmt(), max_new_tokens=self.options.max_new_tokens,
                                       progress=False)
            rates = result.rates(n_resamples=500)
            rates["model"] = name
            frames.append(rates)
            transitions[name] = result.transition_layer(n_resamples=300)
            table = result.frame.assign(model=name)
            self.save_table(f"swap_{name}", table)
        rates = pd.concat(frames, ignore_index=True)
        self.save_table("swap_rates", rates)
        section.figures.append(_curves(rates, "changed", "model", "Vision-token swap: answer change rate by start layer",
                                       "change rate", low="changed_low", high="changed_high"))
        section.tables.append(("Transition layers (unified index, 95% bootstrap range)",
                               pd.DataFrame([{"model": k, **v} for k, v in transitions.items()])))
        self.facts["swap"] = transitions
        section.reading = (
            f"Swapping the image's keys/values from layer L on changes the answer less once L passes the transition "
            f"layer: IN at L{transitions['IN']['unified_layer']}, RL at L{transitions['RL']['unified_layer']} "
            f"(ranges L{transitions['IN']['low'] + 1}-L{transitions['IN']['high'] + 1} and "
            f"L{transitions['RL']['low'] + 1}-L{transitions['RL']['high'] + 1})."
        )

    def ablation(self, section: Section) -> None:
        from ..evaluation.probes import ablation_localization

        items = self.dataset("reasoning", self.options.samples)
        if items is None or not len(items):
            section.reading = "No text reasoning items in --data; this probe was skipped."
            return
        frames = []
        for name in ("IN", "RL"):
            result = ablation_localization(self.models[name], items, fmt=self.fmt(),
                                           max_new_tokens=self.options.max_new_tokens, progress=False)
            summary = result.summary(n_resamples=500)
            summary["model"] = name
            summary["baseline"] = summary.attrs["baseline"]
            frames.append(summary)
        table = pd.concat(frames, ignore_index=True)
        self.save_table("ablation", table)
        section.figures.append(_curves(table, "value", "model", "Reasoning accuracy with one decoder layer skipped",
                                       "accuracy", low="low", high="high"))
        worst = table.loc[table.groupby("model")["change"].idxmin()]
        section.reading = "; ".join(f"{r.model}: skipping L{r.unified_layer} costs the most "
                                    f"({100 * r.change:+.0f} points)" for r in worst.itertuples())

    def batch(self, n: int, answers: bool = False) -> Any:
        from ..evaluation.conditions import build_requests

        items = self.dataset("math", n) or self.dataset("general", n)
        if items is None or not len(items):
            return None, None
        requests = build_requests(items, "image", self.fmt())
        images = [[img.open() for img in r.images] for r in requests]
        gold = [str(r.answer) for r in requests]
        batch = self.models.prepare([r.prompt for r in requests], images, answers=gold if answers else None)
        return batch, requests

    def cross_patching(self, section: Section) -> None:
        from ..analyses import cross_checkpoint_sweep
        from ..analyses import metrics as M

        batch, _ = self.batch(min(self.options.samples, 16))
        if batch is None:
            section.reading = "No VQA items in --data; this analysis was skipped."
            return
        # KL(donor || patched receiver) per sample; "restored" is a ratio of means over samples
        # (1 - mean KL after the patch / mean KL without it), stable where single KLs are tiny
        result = cross_checkpoint_sweep(self.models, batch, positions="all", metric=M.kl_to_clean(),
                                        progress=False, max_rows=64)
        self.save_table("cross_patching", result.frame)
        frame = result.frame
        rows = []
        for (receiver, donor, layer), part in frame.groupby(["receiver", "donor", "layer"], sort=True):
            rows.append({"direction": f"{donor} -> {receiver}", "receiver": receiver, "layer": layer,
                         "unified_layer": layer + 1,
                         "restored": 1 - part["value"].mean() / max(part["corrupt"].mean(), 1e-12)})
        restored = pd.DataFrame(rows)
        self.save_table("cross_patching_restored", restored)
        restored["low"] = restored["high"] = restored["restored"]
        section.figures.append(_curves(restored, "restored", "direction",
                                       "Cross-checkpoint patching: share of the output difference restored",
                                       "restored (1 = all)", low="low", high="high"))
        mid, _ = self.cuts()
        into_in = frame[(frame["receiver"] == "IN") & (frame["layer"] == mid - 1)].sort_values("sample")
        ratio = lambda idx: into_in["value"].to_numpy()[idx].mean() / max(into_in["corrupt"].to_numpy()[idx].mean(), 1e-12)  # noqa: E731
        share = bootstrap(np.arange(len(into_in)), lambda idx: ratio(idx.astype(int)), n_resamples=1000)
        self.facts["cross_patching"] = {"mid_late_share": share.value, "low": share.low, "high": share.high}
        increments = restored[restored["receiver"] == "IN"].copy()
        increments["increment"] = increments["restored"].diff().fillna(increments["restored"])
        section.tables.append(("Share of the RL-vs-IN difference restored by patching RL's residual stream into IN, "
                               "and added by each layer", increments[["unified_layer", "restored", "increment"]]))
        section.reading = (
            f"Patching RL's residual stream into IN at the end of the early third (L{mid}) restores "
            f"{100 * (1 - share.value):.0f}% of the RL-vs-IN output difference (KL); the other "
            f"{100 * share.value:.0f}% [{100 * share.low:.0f}, {100 * share.high:.0f}] arises in the mid and late layers "
            "(bootstrap over prompts)."
        )

    def attention(self, section: Section) -> None:
        from ..analyses.attention_mass import attention_mass, token_attention
        from ..analyses.overlay import overlay_checkpoints

        batch, _ = self.batch(min(self.options.samples, 16))
        if batch is None:
            section.reading = "No VQA items in --data; this analysis was skipped."
            return
        result = attention_mass(self.models, batch, queries="generated", keys="vision",
                                max_new_tokens=max(2, self.options.max_new_tokens), progress=False)
        self.save_table("attention_mass", result.frame)
        diff = result.difference("IN", "RL")
        self.save_table("attention_mass_difference", diff)
        section.figures.append(result.plot(title="Attention of generated tokens on vision tokens"))
        section.figures.append(_curves(diff.assign(model="RL - IN"), "difference", "model",
                                       "Attention mass on vision tokens: RL minus IN (paired 95% CI)",
                                       "difference", low="low", high="high"))
        mid, _ = self.cuts()
        # where on the picture: the last prompt token's attention to each vision token, mid + late layers
        first = batch[:1]
        late_layers = range(mid, self.n_layers())
        values = {name: token_attention(self.models[name], first, queries="last", layers=late_layers)
                  for name in ("IN", "RL")}
        figures = overlay_checkpoints(first, values, title="Last prompt token's attention (mid + late layers)")
        section.figures += [figures["IN"], figures["RL - IN"]]
        frame = result.frame
        per = frame[frame["layer"] >= mid].groupby(["checkpoint", "sample"])["mass"].mean().unstack(0)
        est = paired_difference(per["IN"].to_numpy(), per["RL"].to_numpy(), n_resamples=1000)
        self.facts["attention"] = {"mid_late_difference": est.value, "low": est.low, "high": est.high}
        section.reading = (
            f"Averaged over the mid and late layers, RL's generated tokens put {est.value:+.4f} "
            f"[{est.low:+.4f}, {est.high:+.4f}] more attention on the vision tokens than IN's (paired over prompts)."
        )

    def drift_and_probes(self, section: Section) -> None:
        from ..analyses.collect import collect
        from ..analyses.drift import representation_drift
        from ..analyses.probes import probe_layers

        batch, requests = self.batch(max(self.options.samples, 32))
        if batch is None:
            section.reading = "No VQA items in --data; this analysis was skipped."
            return
        drift = representation_drift(self.models, batch, progress=False)
        self.save_table("drift", drift.frame)
        section.figures.append(drift.plot("rel_norm"))
        labels = [str(r.answer) for r in requests]
        if len(set(labels)) > 1 and len(labels) >= 8:
            acts = collect(self.models, batch, groups=("last",), reduce="mean", progress=False)
            probes = probe_layers(acts, labels, group="last", seeds=(0, 1), test_size=0.3)
            self.save_table("probes", probes.frame)
            section.figures.append(probes.plot(title="Linear probe for the answer (last token), IN and RL"))
        late = drift.frame[drift.frame["group"] == "vision"].sort_values("layer")
        section.reading = (
            "Relative change of the residual stream between IN and RL on identical inputs, per layer and token group; "
            f"on vision tokens it grows from {late['rel_norm'].iloc[0]:.3f} (first layer) to "
            f"{late['rel_norm'].iloc[-1]:.3f} (last layer)."
        )

    def transfer(self, section: Section) -> None:
        from ..evaluation.transfer import transfer_table
        from ..weights.plans import published_variants

        general = self.dataset("general", self.options.eval_items)
        math = self.dataset("math", self.options.eval_items)
        reasoning = self.dataset("reasoning", self.options.eval_items)
        if general is None and math is None and reasoning is None:
            section.reading = "No evaluation data in --data; the transfer table was skipped."
            return
        plans = published_variants("IN", "RL", cuts=self.cuts())
        table = transfer_table(self.models["IN"], {k: v for k, v in self.inputs.checkpoints.items() if k != "Base"},
                               plans, general=general, math=math, reasoning=reasoning,
                               max_new_tokens=self.options.max_new_tokens, prompt=self.fmt(), progress=False,
                               batch_size=32)
        self.save_table("transfer_table", table.frame)
        section.figures.append(table.plot())
        section.tables.append(("M_vis / M_v2r / M_rea (%) per variant", table.wide().reset_index()))
        self.facts["transfer"] = table.frame.to_dict("records")
        section.reading = ("Each variant takes early:mid:late decoder thirds from IN or RL; the vision tower, projector, "
                           "embeddings and head stay IN's.")

    def freezing(self, section: Section) -> None:
        testbed = self.inputs.testbed
        if testbed is None:
            section.reading = "Freezing needs RL re-runs; it runs on the built-in testbed only."
            return
        from ..testbed.necessity import necessity_table

        table = necessity_table(testbed, quiet=self.options.quiet)
        self.save_table("freezing", table.frame)
        section.figures.append(table.plot())
        section.tables.append(("Held-out accuracy after RL with one third frozen", table.summary()))
        self.facts["freezing"] = table.frame.to_dict("records")
        section.reading = "RL re-run with each third of the decoder frozen (same seed and recipe), scored on held-out items."

    # ------------------------------------------------------------------ claims

    def judge(self) -> list[Claim]:
        claims = []
        w, cp = self.facts.get("weights"), self.facts.get("cross_patching")
        if w or cp:
            evidence, votes = [], []
            if w:
                ratio = w["rl_mid_late_energy_share"] / max(w["mid_late_param_share"], 1e-9)
                votes.append(True if ratio > 1.1 else False if ratio < 0.9 else None)
                evidence.append(f"mid+late hold {100 * w['rl_mid_late_energy_share']:.0f}% of RL's update energy "
                                f"vs {100 * w['mid_late_param_share']:.0f}% of the parameters")
            if cp:
                votes.append(True if cp["low"] > 0.5 else False if cp["high"] < 0.5 else None)
                evidence.append(f"{100 * cp['mid_late_share']:.0f}% [{100 * cp['low']:.0f}, {100 * cp['high']:.0f}] "
                                "of the RL-vs-IN output difference arises in mid+late layers")
            claims.append(Claim("RL's changes concentrate in mid-to-late layers.", _verdict(votes), "; ".join(evidence) + "."))
        a = self.facts.get("attention")
        if a:
            verdict = "supported" if a["low"] > 0 else "not supported" if a["high"] < 0 else "inconclusive"
            claims.append(Claim("Attention from reasoning (generated) tokens to vision tokens rises in mid-to-late layers.",
                                verdict, f"RL minus IN attention mass over mid+late layers: {a['mid_late_difference']:+.4f} "
                                f"[{a['low']:+.4f}, {a['high']:+.4f}] (paired bootstrap, 95%)."))
        s = self.facts.get("swap")
        if s:
            same = s["IN"]["low"] <= s["RL"]["layer"] <= s["IN"]["high"] or s["RL"]["low"] <= s["IN"]["layer"] <= s["RL"]["high"]
            claims.append(Claim("RL does not change where the image is read (perception): the swap transition layer is unchanged.",
                                "supported" if same else "not supported",
                                f"transition layer IN L{s['IN']['unified_layer']} (L{s['IN']['low'] + 1}-L{s['IN']['high'] + 1}), "
                                f"RL L{s['RL']['unified_layer']} (L{s['RL']['low'] + 1}-L{s['RL']['high'] + 1})."))
        t = self.facts.get("transfer")
        if t:
            claims.append(_transfer_claim(pd.DataFrame(t)))
        f = self.facts.get("freezing")
        if f:
            claims.append(_freezing_claim(pd.DataFrame(f)))
        return claims

    # ------------------------------------------------------------------ run

    def report(self, subtitle: str) -> Report:
        return Report(title="vlm_probe: what did RL change, and where?", subtitle=subtitle, claims=self.claims,
                      sections=self.sections, footer="Tables: *.parquet beside this file; provenance: run.json.")


def _verdict(votes: list[bool | None]) -> str:
    if votes and all(v is True for v in votes):
        return "supported"
    if votes and all(v is False for v in votes):
        return "not supported"
    return "inconclusive"


def _transfer_claim(frame: pd.DataFrame) -> Claim:
    metric = "M_v2r" if "M_v2r" in set(frame["metric"]) else frame["metric"].iloc[0]
    part = frame[frame["metric"] == metric].set_index("variant")
    if not {"IN", "RL", "IN:RL:RL", "RL:IN:IN"} <= set(part.index):
        return Claim("RL's mid-to-late blocks transfer by merging.", "inconclusive", "The variants needed were not scored.")
    gain = part.loc["RL", "value"] - part.loc["IN", "value"]
    late = part.loc["IN:RL:RL", "value"] - part.loc["IN", "value"]
    early = part.loc["RL:IN:IN", "value"] - part.loc["IN", "value"]
    above = part.loc["IN:RL:RL", "low"] > part.loc["IN", "value"]
    if gain <= 0 or part.loc["RL", "low"] <= part.loc["IN", "value"]:
        verdict = "inconclusive"  # no clear RL gain to transfer
    elif above and late > early:
        verdict = "supported"
    elif late <= early:
        verdict = "not supported"
    else:
        verdict = "inconclusive"
    return Claim("RL's mid-to-late blocks transfer by merging.", verdict,
                 ("RL's interval does not clear IN, so there is no clear gain to transfer. " if verdict == "inconclusive"
                  else "") + f"{metric}: RL - IN = {gain:+.1f} points; IN with RL's mid+late (IN:RL:RL) {late:+.1f}; IN with RL's "
                 f"early third (RL:IN:IN) {early:+.1f}; IN:RL:RL interval "
                 f"[{part.loc['IN:RL:RL', 'low']:.1f}, {part.loc['IN:RL:RL', 'high']:.1f}] vs IN {part.loc['IN', 'value']:.1f}.")


def _freezing_claim(frame: pd.DataFrame, family: str = "v2r") -> Claim:
    text = "Freezing the mid-to-late blocks during RL removes the gain."
    part = frame[frame["family"] == family].set_index("variant") if "family" in frame else pd.DataFrame()
    needed = {"RL", "RL-frozen-early", "RL-frozen-mid", "RL-frozen-late"}
    if not needed <= set(part.index):
        return Claim(text, "inconclusive", "Not every freezing variant was run.")
    rl = part.loc["RL"]
    evidence = (f"{family} accuracy: RL - IN = {rl['vs_IN']:+.3f} [{rl['vs_IN_low']:+.3f}, {rl['vs_IN_high']:+.3f}]; "
                + "; ".join(f"{t} frozen vs RL {part.loc['RL-frozen-' + t, 'vs_RL']:+.3f} "
                            f"[{part.loc['RL-frozen-' + t, 'vs_RL_low']:+.3f}, {part.loc['RL-frozen-' + t, 'vs_RL_high']:+.3f}]"
                            for t in ("early", "mid", "late")) + " (paired bootstrap, 95%).")
    if rl["vs_IN_low"] <= 0:
        return Claim(text, "inconclusive", "RL's own gain is not distinguishable from zero here, so there is no gain "
                     "to remove. " + evidence)
    lost = [t for t in ("mid", "late") if part.loc["RL-frozen-" + t, "vs_RL_high"] < 0]
    early_kept = part.loc["RL-frozen-early", "vs_RL_high"] >= 0
    verdict = "supported" if lost and early_kept else "not supported" if not lost else "inconclusive"
    return Claim(text, verdict, evidence)


def _curves(frame: pd.DataFrame, value: str, series: str, title: str, y: str, *, low: str, high: str) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, part in frame.groupby(series, sort=False):
        part = part.sort_values("unified_layer")
        x = list(part["unified_layer"])
        fig.add_trace(go.Scatter(x=x, y=part[value], mode="lines+markers", name=str(name)))
        fig.add_trace(go.Scatter(x=x + x[::-1], y=list(part[high]) + list(part[low])[::-1], fill="toself",
                                 opacity=0.15, line={"width": 0}, showlegend=False, hoverinfo="skip"))
    fig.update_layout(title=title, xaxis_title="layer (unified index)", yaxis_title=y, template="plotly_white",
                      height=420)
    return fig


SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("weights", "Weight deltas and spectra", "weights"),
    ("swap", "Vision-token swap localization", "swap"),
    ("ablation", "Layer-ablation localization on reasoning", "ablation"),
    ("cross_patching", "Cross-checkpoint patching", "cross_patching"),
    ("attention", "Attention mass: generated tokens on vision tokens", "attention"),
    ("drift", "Representation drift and probes", "drift_and_probes"),
    ("transfer", "Transfer table: block merges", "transfer"),
    ("freezing", "Freezing necessity (testbed)", "freezing"),
)


def analyze(
    in_path: str | os.PathLike | None = None,
    rl_path: str | os.PathLike | None = None,
    *,
    base_path: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike = "vlm_probe_out",
    options: Options | None = None,
    reduced: bool = False,
    seed: int = 0,
    command: str = "",
) -> Analysis:
    """Run the whole analysis and write ``out/report.html``, the tables and ``out/run.json``."""
    options = options or Options()
    started = time.perf_counter()
    inputs = resolve_inputs(in_path, rl_path, base_path, data, reduced=reduced, seed=seed, quiet=options.quiet,
                            cuts=options.cuts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    analysis = Analysis(inputs, out, options)
    for name, title, method in SECTIONS:
        if name == "freezing" and not options.freezing:
            continue
        analysis.run(name, title, getattr(analysis, method))
    analysis.claims = analysis.judge()
    family = analysis.models["IN"].spec.display_name
    where = "the built-in testbed" if inputs.testbed is not None else str(inputs.checkpoints["RL"])
    report = analysis.report(f"{family}, IN vs RL, on {where}")
    report.write(out / "report.html")
    _provenance(analysis, out, command, time.perf_counter() - started)
    return analysis


def _provenance(analysis: Analysis, out: Path, command: str, seconds: float) -> None:
    import nnsight
    import torch
    import transformers

    from .. import __version__

    vlm = analysis.models["IN"]
    atomic_write_json(out / "run.json", {
        "command": command or " ".join(sys.argv),
        "vlm_probe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"), "python": platform.python_version(),
        "machine": platform.machine(),
        "checkpoints": {k: str(v) for k, v in analysis.inputs.checkpoints.items()},
        "data": {k: str(v) for k, v in analysis.inputs.data.items()},
        "testbed": str(analysis.inputs.testbed.path) if analysis.inputs.testbed is not None else None,
        "options": analysis.options.__dict__,
        "dtype": str(next(vlm.hf.parameters()).dtype), "attention": vlm.attn_implementation,
        "seeds": {"bootstrap": 0, "testbed": analysis.inputs.testbed.recipe.seed}
        if analysis.inputs.testbed is not None else {"bootstrap": 0},
        "timings_s": {**analysis.timings, "total": seconds},
        "claims": [c.__dict__ for c in analysis.claims],
        "failures": analysis.facts.get("failures", {}),
        "tables": sorted(f"{name}.parquet" for name in analysis.tables),
    })
