"""``vlm-probe analyze``: the whole Frankenstein analysis and its HTML report."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_options, model_options

EXAMPLE = """examples:
  vlm-probe analyze --out report/                       # the built-in CPU testbed (built on first use)
  vlm-probe analyze --in ckpt/in --rl ckpt/rl --base ckpt/base --data mydata/ --out report/
  vlm-probe analyze --in /models/vl-7b-in --rl /models/vl-7b-rl --data mydata/ --dtype bf16 --device-map auto --cuts 8,20
--data holds any of swap.jsonl (swap pairs), perception.jsonl (general VQA, M_vis),
v2r.jsonl (VQA with descriptions, M_v2r), text.jsonl (text reasoning, M_rea)."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="run the whole IN-vs-RL analysis and write an HTML report",
                            description="Localize what RL changed: weights, swap and ablation probes, patching, "
                            "attention mass, drift, probes, block merges (and freezing on the testbed).",
                            epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="in_path", help="IN (supervised cold start) checkpoint directory")
    parser.add_argument("--rl", dest="rl_path", help="RL checkpoint directory")
    parser.add_argument("--base", dest="base_path", help="Base checkpoint directory (weights only)")
    parser.add_argument("--data", help="folder with the analysis datasets (default: the testbed's)")
    parser.add_argument("--out", default="vlm_probe_out", help="output directory (report.html, tables, run.json)")
    parser.add_argument("--samples", type=int, default=24, help="items per probe")
    parser.add_argument("--eval-items", type=int, default=48, help="items per dataset in the transfer table")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--cuts", help="where the mid and late thirds start (0-based), e.g. 9,18")
    parser.add_argument("--reduced", action="store_true", help="use the reduced (seconds) testbed")
    parser.add_argument("--seed", type=int, default=0, help="testbed seed")
    parser.add_argument("--no-freezing", action="store_true", help="skip the testbed freezing runs")
    add_model_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import transformers

    from ..report.analyze import Options, analyze

    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    options = Options(samples=args.samples, eval_items=args.eval_items, max_new_tokens=args.max_new_tokens,
                      cuts=args.cuts, quiet=args.quiet, freezing=not args.no_freezing, load=model_options(args))
    analysis = analyze(args.in_path, args.rl_path, base_path=args.base_path, data=args.data, out=args.out,
                       options=options, reduced=args.reduced, seed=args.seed, command="vlm-probe " + " ".join(sys.argv[1:]))
    print(f"{'claim':<70} verdict")
    for claim in analysis.claims:
        print(f"{claim.text[:68]:<70} {claim.verdict}")
    failures = analysis.facts.get("failures", {})
    for name, error in failures.items():
        print(f"section {name} failed: {error}", file=sys.stderr)
    timing = sum(analysis.timings.values())
    print(f"report: {analysis.out / 'report.html'} ({timing:.0f} s)")
    return 1 if failures else 0
