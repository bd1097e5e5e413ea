"""``vlm-probe eval``: score a checkpoint on a dataset file (resumable with ``--out``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_model_options, check_out, load_model, positive_int

EXAMPLE = """\
example:
  vlm-probe eval ./checkpoints/RL --data data/general.jsonl --conditions image blank \\
      --out runs/RL/general --batch-size 16 --max-new-tokens 256
  (run it again after an interruption: finished items are skipped)

The dataset layout is detected from its fields: vision-token-swap pairs
(target_image, source_image, prompt, meta), VQA items (question, image, answer) or
text-only items (question, answer).
"""


def register(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a dataset (greedy, resumable)",
        description="Generate greedily, grade every answer and report accuracy with bootstrap intervals.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint directory or hub id")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="dataset jsonl (or a swap-pair folder holding <task>/data.jsonl)")
    parser.add_argument("--out", metavar="DIR",
                        help="run directory: rows are appended as they finish (resumable); default: nothing written")
    parser.add_argument("--conditions", nargs="+", metavar="C",
                        help="image, blank, description, text (VQA/text) or target, source (swap pairs); "
                        "default: every condition the dataset supports")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="tokens generated per answer")
    parser.add_argument("--system", help="system prompt (default: none)")
    parser.add_argument("--instruction", help="text appended after every question, e.g. 'Answer with a number.' "
                        "(default: none)")
    parser.add_argument("--limit", type=positive_int, metavar="N",
                        help="only the first N items (in all: a swap-pair root's tasks are read in name order); "
                        "default: every item")
    parser.add_argument("--by", default="condition", choices=("condition", "category", "task"),
                        help="group accuracies by this column")
    parser.add_argument("--seed", type=int, default=0, help="seed recorded with the run (greedy decoding)")
    parser.add_argument("--overwrite", action="store_true", help="discard an earlier run in --out with other settings")
    add_model_options(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..evaluation.conditions import PromptFormat
    from ..evaluation.datasets import load_dataset
    from ..evaluation.runner import evaluate

    check_out(args.out)  # an existing run directory is resumed
    dataset = load_dataset(args.data, limit=args.limit)  # bad data fails before the model loads
    vlm = load_model(args.model, args)
    result = evaluate(
        vlm, dataset, conditions=args.conditions, out=args.out, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, system=args.system, prompt=PromptFormat(instruction=args.instruction),
        seed=args.seed, quiet=args.quiet, overwrite=args.overwrite, name=Path(args.model).name or args.model,
    )
    table = result.accuracy(args.by)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    failed = result.failures()
    if len(failed):
        print(f"\n{len(failed)} item(s) could not be run:")
        print(failed.head(10).to_string(index=False))
    if args.out:
        print(f"\nrows: {args.out}/rows/  result: {args.out}/result/")
    return 0
