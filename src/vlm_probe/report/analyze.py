"""The main job: what did RL change in an IN/RL pair, and where? Analyses, claims, report.

``analyze(...)`` runs on one checkpoint pair (the built-in testbed when none is given):

1. the pipeline (:mod:`.pipeline`, :mod:`.sections`): weight deltas and spectra, vision-token
   swap, layer ablation, cross-checkpoint patching, attention on the image, logit lens, drift
   and probes, the transfer table of the six block merges, the testbed's freezing runs; each
   section saves its tables atomically, or records why it was skipped;
2. the claims (:mod:`.claims`), judged from the saved tables, and the answer-first summary
   (:mod:`.summary`);
3. ``run.json`` (provenance, options, margins, sections, verdicts) and ``report.html``
   (:mod:`.render`, drawn from the tables).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, check_writable_dir
from .claims import ClaimResult, judge
from .inputs import Inputs, resolve_inputs
from .pipeline import Options, Pipeline, SectionRecord
from .render import PAPER, render
from .sections import SECTIONS
from .summary import answer_first

__all__ = ["Analysis", "Options", "SECTIONS", "analyze"]


@dataclass
class Analysis:
    """A finished run: where it wrote, the sections, the verdicts, the summary and the timings."""

    out: Path
    inputs: Inputs
    sections: list[SectionRecord]
    claims: list[ClaimResult]
    summary: list[str]
    timings: dict[str, float]
    run: dict[str, Any]

    @property
    def failures(self) -> dict[str, str]:
        return {r.id: r.reason for r in self.sections if r.status == "failed"}

    @property
    def skipped(self) -> list[SectionRecord]:
        return [r for r in self.sections if r.status == "skipped"]


def describe_model(vlm: Any, inputs: Inputs) -> dict[str, Any]:
    """What model this is, for the report's header."""
    params = sum(p.numel() for p in vlm.hf.parameters())
    family = vlm.spec.display_name
    size = f"{params / 1e6:.1f} M" if params < 1e9 else f"{params / 1e9:.1f} B"
    blocks = vlm.n_vision_blocks
    shape = f"{vlm.n_layers} decoder layers, {blocks} vision block{'s' if blocks != 1 else ''}"
    if inputs.testbed is not None:
        recipe = inputs.testbed.recipe
        reduced = " (reduced, for tests)" if getattr(recipe, "reduced", False) else ""
        text = (f"The built-in testbed{reduced}: a {size}-parameter {family} ({shape}) that vlm_probe trains on "
                f"synthetic scenes of coloured shapes, Base -> IN (supervised) -> RL (GRPO), seed {recipe.seed}.")
    else:
        text = f"A {size}-parameter {family} ({shape}): IN {inputs.checkpoints['IN']}, RL {inputs.checkpoints['RL']}."
    return {"family": family, "parameters": params, "n_layers": vlm.n_layers, "vision_blocks": vlm.n_vision_blocks,
            "dtype": str(next(vlm.hf.parameters()).dtype), "attention": vlm.attn_implementation, "description": text}


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
    started: float | None = None,
) -> Analysis:
    """Run the analyses, judge the claims, write ``out/report.html``, the tables and ``out/run.json``.

    Args:
        in_path: IN checkpoint directory (with ``rl_path``; neither: the built-in testbed).
        rl_path: RL checkpoint directory.
        base_path: optional Base checkpoint (weights section only).
        data: a folder with any of swap.jsonl (or ``<task>/data.jsonl``), perception.jsonl,
            v2r.jsonl, text.jsonl (default: the testbed's held-out set).
        options: see :class:`~vlm_probe.report.pipeline.Options`.
        started: when the command started (``time.perf_counter()``), so the recorded total
            includes building the testbed and loading.
    """
    options = options or Options()
    started = time.perf_counter() if started is None else started
    check_writable_dir(out, overwrite=True)  # an unusable --out fails before any work
    inputs = resolve_inputs(in_path, rl_path, base_path, data, reduced=reduced, seed=seed, quiet=options.quiet,
                            cuts=options.cuts)
    prepared = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = Pipeline(inputs, out, options)
    pipeline.run(SECTIONS)
    cuts = pipeline.cuts
    claims = judge(pipeline.tables, cuts=cuts, params=options.claims)
    summary = answer_first(pipeline.tables, claims, cuts, options.claims)
    finished = time.perf_counter()
    timings = {**{r.id: r.seconds for r in pipeline.records}, "inputs_and_testbed": prepared - started,
               "analysis": finished - prepared, "total": finished - started}
    run = _record(pipeline, claims, summary, timings, command)
    atomic_write_json(out / "run.json", run)
    render(out)
    timings["total"] = time.perf_counter() - started
    return Analysis(out, inputs, pipeline.records, claims, summary, timings, run)


def _data_description(pipeline: Pipeline) -> str:
    inputs = pipeline.inputs
    if not inputs.data:
        return "none"
    where = "the testbed's held-out set" if inputs.testbed is not None else str(inputs.data_dir)
    return f"{where} ({', '.join(p.name if p.is_file() else p.name + '/' for p in inputs.data.values())}); " \
           f"answers generated with up to {pipeline.max_new_tokens} new tokens ({pipeline.max_new_tokens_source})"


def _record(pipeline: Pipeline, claims: list[ClaimResult], summary: list[str], timings: dict[str, float],
            command: str) -> dict[str, Any]:
    import nnsight
    import torch
    import transformers

    from .. import __version__

    inputs = pipeline.inputs
    return {
        "command": command or " ".join(sys.argv),
        "vlm_probe": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "nnsight": getattr(nnsight, "__version__", "?"), "python": platform.python_version(),
        "machine": platform.machine(), "paper": PAPER,
        "checkpoints": {k: str(v) for k, v in inputs.checkpoints.items()},
        "data": {k: str(v) for k, v in inputs.data.items()},
        "data_description": _data_description(pipeline),
        "testbed": str(inputs.testbed.path) if inputs.testbed is not None else None,
        "model": describe_model(pipeline.models["IN"], inputs),
        "dtype": str(next(pipeline.models["IN"].hf.parameters()).dtype),
        "attention": pipeline.models["IN"].attn_implementation,
        "cuts": pipeline.cuts.as_dict(),
        "options": {**pipeline.options.record(), "chunk": pipeline.chunk, "max_new_tokens": pipeline.max_new_tokens,
                    "max_new_tokens_source": pipeline.max_new_tokens_source, "workers": pipeline.workers},
        "seeds": {"bootstrap": pipeline.options.claims.seed,
                  **({"testbed": inputs.testbed.recipe.seed} if inputs.testbed is not None else {})},
        "sections": [asdict(r) for r in pipeline.records],
        "claims": [c.as_dict() for c in claims],
        "summary": summary,
        "timings_s": timings,
        "failures": pipeline.failures,
        "tables": sorted(pipeline.tables),
    }
