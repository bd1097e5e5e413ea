"""``vlm-probe analyze``: the whole IN-vs-RL analysis, its verdicts, and its HTML report."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from typing import Any

from .common import add_model_options, check_out, model_options, parse_cuts, positive_int

EXAMPLE = """examples:
  vlm-probe analyze --out report/                       # the built-in CPU testbed (built on first use)
  vlm-probe analyze --reduced --out report/             # the reduced testbed: seconds, for a first look
  vlm-probe analyze --in ckpt/in --rl ckpt/rl --base ckpt/base --data mydata/ --out report/
  vlm-probe analyze --in /models/vl-7b-in --rl /models/vl-7b-rl --data shared/data/vision_swap_pairs \\
      --dtype bf16 --device-map auto --samples 256 --cuts 9,18
--data holds any of swap.jsonl or <task>/data.jsonl (swap pairs), perception.jsonl (general VQA, M_vis),
v2r.jsonl (VQA with descriptions, M_v2r), text.jsonl (text reasoning, M_rea), and optionally
manifest.json ({"prompt_format": {...}, "generation": {"max_new_tokens": N}}). Sections whose data
is missing are skipped, and the report and this command say which file would enable them."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="run the whole IN-vs-RL analysis and write an HTML report",
                            description="Localize what RL changed: weights, swap and ablation probes, patching, "
                            "attention on the image, logit lens, drift and probes, block merges (and freezing on "
                            "the testbed); judge the published claims from the results.",
                            epilog=EXAMPLE)
    parser.add_argument("--in", dest="in_path", help="IN (supervised cold start) checkpoint directory "
                        "(default: the built-in testbed's)")
    parser.add_argument("--rl", dest="rl_path", help="RL checkpoint directory (default: the built-in testbed's)")
    parser.add_argument("--base", dest="base_path", help="Base checkpoint directory, for the weights section "
                        "(default: the testbed's, or none)")
    parser.add_argument("--data", help="folder with the analysis datasets (default: the testbed's held-out set)")
    parser.add_argument("--out", default="vlm_probe_out", help="output directory (report.html, tables, run.json)")
    parser.add_argument("--samples", type=positive_int, help="items per probe, task-stratified (default: every item given; "
                        "set it for large models)")
    parser.add_argument("--eval-items", type=positive_int, help="items per dataset in the transfer table, task-stratified "
                        "(default: every item)")
    parser.add_argument("--max-new-tokens", type=positive_int, help="tokens generated per answer (default: the data's "
                        "manifest.json generation.max_new_tokens, else 32)")
    parser.add_argument("--cuts", help="where the mid and late thirds start, 0-based decoder indices, e.g. 9,18 "
                        "(default: N//3,2N//3)")
    parser.add_argument("--merge-host", default="early", help="merge variants keep the vision tower, projector, "
                        "embeddings and head of: 'early' (the early third's source, as published) or a checkpoint "
                        "name such as IN")
    parser.add_argument("--chunk", type=positive_int, help="prompts per forward or generation batch "
                        "(default: 128 on the built-in testbed, else 32)")
    parser.add_argument("--reduced", action="store_true", help="use the reduced (seconds) testbed")
    parser.add_argument("--seed", type=int, default=0, help="testbed seed")
    parser.add_argument("--no-freezing", action="store_true", help="skip the testbed freezing runs")
    parser.add_argument("--workers", type=positive_int, help="processes that run the sections side by side, one "
                        "torch thread each (default: the usable cores, at most 4 and at most one per section, when "
                        "the models run on CPU; 1 with --device-map on an accelerator, so a large model is not "
                        "loaded twice on one GPU). 1 runs them in this process, one after another, with --threads")
    add_model_options(parser)
    parser.set_defaults(func=run)


def _wrap(prefix: str, text: str, width: int) -> str:
    """``prefix`` then ``text``, every line at most ``width`` wide, continuations under the text."""
    return textwrap.fill(text, width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix),
                         break_on_hyphens=False)


def print_summary(analysis: Any, started: float, file: Any = None) -> None:
    """The verdicts (never cut), what was skipped and why, and where the report is."""
    file = file or sys.stdout
    width = max(60, min(120, shutil.get_terminal_size((100, 20)).columns))
    print("What did RL change, and where?", file=file)
    for sentence in analysis.summary:
        print(_wrap("  ", sentence, width), file=file)
    print("\nThe published claims on this run:", file=file)
    for claim in analysis.claims:
        print(_wrap(f"  {claim.verdict.value:<20} ", claim.text, width), file=file)
    print("\nSamples:", file=file)
    for record in analysis.sections:
        if record.status == "ran" and record.samples:
            print(_wrap(f"  {record.id:<15}", "; ".join(record.samples), width), file=file)
    for record in analysis.skipped:
        print(_wrap("  ", f"skipped {record.title}: {record.reason} To run it: {record.enable}.", width), file=file)
    for name, error in analysis.failures.items():
        print(f"section {name} failed: {error}", file=sys.stderr)
    total = time.perf_counter() - started
    t = analysis.timings
    print(f"\nreport: {analysis.out / 'report.html'}  (total {total:.0f} s: inputs and testbed "
          f"{t['inputs_and_testbed']:.0f} s, analyses {t['analysis']:.0f} s)", file=file)


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..report.analyze import Options, analyze

    started = time.perf_counter()
    parse_cuts(args.cuts)
    check_out(args.out)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    options = Options(samples=args.samples, eval_items=args.eval_items, max_new_tokens=args.max_new_tokens,
                      cuts=args.cuts, merge_host=args.merge_host, chunk=args.chunk, quiet=args.quiet,
                      freezing=not args.no_freezing, load=model_options(args), workers=args.workers)
    analysis = analyze(args.in_path, args.rl_path, base_path=args.base_path, data=args.data, out=args.out,
                       options=options, reduced=args.reduced, seed=args.seed,
                       command="vlm-probe " + " ".join(sys.argv[1:]), started=started)
    print_summary(analysis, started)
    return 1 if analysis.failures else 0
