"""``vlm-probe testbed``: build the CPU-sized Base -> IN -> RL testbed, and report what RL changed."""

from __future__ import annotations

import argparse
from typing import Any

from .common import check_out, positive_int

BUILD_EXAMPLE = """\
examples:
  vlm-probe testbed build                 # full build with the freezing re-runs (about 8 minutes on 2 cores), cached
  vlm-probe testbed build --reduced       # tiny test-size build (seconds)
  vlm-probe testbed build --family qwen2_5_vl --seed 1 --force --quiet
"""
REPORT_EXAMPLE = """\
examples:
  vlm-probe testbed report --seeds 0 1 2          # IN vs RL per task family, paired bootstrap CIs
  vlm-probe testbed report --seeds 0 1 2 --out rl_effect/
"""


def register(subparsers: Any) -> None:
    """Add ``testbed build`` and ``testbed report`` to the ``vlm-probe`` command."""
    parser = subparsers.add_parser(
        "testbed",
        help="build the CPU-sized Base -> IN -> RL testbed",
        description="The synthetic shapes testbed: tiny VLM checkpoints trained by vlm_probe itself.",
        epilog=BUILD_EXAMPLE + REPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="testbed_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    build = sub.add_parser(
        "build",
        help="build (or reuse) the Base, IN and RL checkpoints",
        description="Train Base -> IN -> RL on the synthetic tasks; checkpoints land in the user cache.",
        epilog=BUILD_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    build.add_argument("--seed", type=int, default=0, help="recipe seed (default 0)")
    build.add_argument("--family", default="llava",
                       help="model family from the zoo (default llava; the recipe is tuned for llava and qwen2_5_vl)")
    build.add_argument("--reduced", action="store_true", help="the tiny test-size recipe (seconds)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    build.add_argument("--cache-dir", default=None, help="cache root (default $VLM_PROBE_CACHE or ~/.cache/vlm_probe)")
    build.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads per process (default: vlm_probe.threads.default_threads(), "
                            "1 on a 2-core machine)")
    build.add_argument("--workers", type=positive_int, default=None,
                       help="processes for the RL runs and freezing re-runs, and for the data-parallel Base and "
                            "IN stages while cores are idle (default: the usable cores, at most 4; the weights "
                            "are the same for any number)")
    build.add_argument("--no-variants", action="store_true", help="skip the three freezing re-runs")
    build.set_defaults(func=run_build)

    report = sub.add_parser(
        "report",
        help="IN vs RL accuracy per task family over seeds (paired bootstrap CIs)",
        description="Build the testbed for each seed (cached) and compare IN with RL on the shared held-out set.",
        epilog=REPORT_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="recipe seeds (default 0 1 2)")
    report.add_argument("--family", default="llava", help="model family (default llava)")
    report.add_argument("--reduced", action="store_true", help="use the tiny test-size recipe")
    report.add_argument("--by", choices=["family", "task"], default="family", help="rows of the printed table")
    report.add_argument("--out", default=None, help="save the result (table.parquet, meta.json) to this folder")
    report.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    report.add_argument("--cache-dir", default=None, help="cache root")
    report.set_defaults(func=run_report)


def run_build(args: argparse.Namespace) -> int:
    from ..testbed.build import THIRD_VARIANTS, build_testbed
    from ..testbed.recipe import Recipe

    recipe = (Recipe.reduced_size() if args.reduced else Recipe()).replace(seed=args.seed, family=args.family)
    testbed = build_testbed(recipe, force=args.force, quiet=args.quiet, cache_dir=args.cache_dir,
                            variants=() if args.no_variants else THIRD_VARIANTS, workers=args.workers,
                            threads=args.threads)
    print(testbed.path)
    return 0


def run_report(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..testbed.recipe import Recipe
    from ..testbed.rl_effect import rl_effect

    check_out(args.out)
    recipe = (Recipe.reduced_size() if args.reduced else Recipe()).replace(family=args.family)
    result = rl_effect(args.seeds, recipe=recipe, quiet=args.quiet, cache_dir=args.cache_dir)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(result.table(args.by).to_string(index=False))
    if args.out:
        print(result.save(args.out))
    return 0
