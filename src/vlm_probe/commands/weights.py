"""``vlm-probe weights BASE IN RL``: weight deltas of a chain of checkpoints, without building a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from ..errors import InputError
from ..io import atomic_write_text
from .common import check_out, parse_cuts, positive_int

EXAMPLE = """example:
  vlm-probe weights ckpt/base ckpt/in ckpt/rl --cuts 8,20 --top-k 50 --out runs/weights
  vlm-probe weights ckpt/in ckpt/rl --names IN,RL --svd none      # norms only: fast

writes DIR/weights.parquet (one row per tensor and step), DIR/weights.json (with per-region
and per-layer aggregates) and DIR/weights.html (figure); always prints a per-region summary.
"""

_OUTPUTS = ("weights.parquet", "weights.json", "weights.html")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "weights",
        help="weight deltas, energy shares, spectra and update overlap of a chain of checkpoints",
        description="Stream two or more checkpoints (Base IN RL ...) tensor by tensor and measure each step's "
        "update: norms, relative norms, energy share by region, singular spectra, and the overlap between "
        "consecutive updates (cosine, sign agreement, principal angles).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT",
                        help="checkpoint directories in chain order (e.g. BASE IN RL)")
    parser.add_argument("--names", help="comma-separated names (default: Base,IN,RL for three, IN,RL for two)")
    parser.add_argument("--out", metavar="DIR", help="write weights.parquet, weights.json and weights.html here "
                        "(default: print the summary only)")
    parser.add_argument("--cuts", help="0-based decoder indices where the mid and late regions start, e.g. 8,20 "
                        "(default: N//3,2N//3)")
    parser.add_argument("--svd", choices=("auto", "exact", "randomized", "none"), default="auto",
                        help="spectra: auto / exact (every singular value, float64 Gram eigenvalues), randomized (top-k "
                             "with an error bound; marked, kept out of aggregate means), none (norms only)")
    parser.add_argument("--top-k", type=positive_int, default=50, help="singular values/vectors kept per delta")
    parser.add_argument("--device", default="auto", help="where spectra run: auto (CUDA when present), cpu, cuda, ...")
    parser.add_argument("--include", metavar="REGEX", help="only tensors whose module-path name matches "
                        "(default: every tensor)")
    parser.add_argument("--allow-pickle", action="store_true", help="accept pickle-only checkpoints (trusted only)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def _names(args: argparse.Namespace) -> list[str]:
    count = len(args.checkpoints)
    if args.names:
        names = [n.strip() for n in args.names.split(",") if n.strip()]
        if len(names) != count or len(set(names)) != count:
            raise InputError(f"--names needs {count} distinct names, got {args.names!r}.")
        return names
    if count == 3:
        return ["Base", "IN", "RL"]
    if count == 2:
        return ["IN", "RL"]
    return [f"ckpt{i}" for i in range(count)]


def run(args: argparse.Namespace) -> int:
    if len(args.checkpoints) < 2:
        raise InputError("vlm-probe weights needs at least two checkpoints (e.g. BASE IN RL).")
    parse_cuts(args.cuts)
    check_out(args.out)
    out = Path(args.out) if args.out else None
    if out is not None and not args.overwrite:
        existing = [name for name in _OUTPUTS if (out / name).exists()]
        if existing:
            raise InputError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace them.")
    from ..weights.compare import compare_weights
    from ..weights.spectra import SVDConfig

    names = _names(args)
    result = compare_weights(
        dict(zip(names, args.checkpoints)), cuts=args.cuts,
        svd=SVDConfig(mode=args.svd, top_k=args.top_k, device=args.device),
        include=args.include, allow_pickle=args.allow_pickle, quiet=args.quiet,
    )
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(result.summary().to_string(index=False))
    for warning in result.meta.get("warnings", []):
        print(f"warning: {warning}")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.to_parquet(out / "weights.parquet")
        result.to_json(out / "weights.json")
        html = result.plot().to_html(include_plotlyjs=True, full_html=True)
        atomic_write_text(out / "weights.html", html)
        print(f"wrote {', '.join(os.fspath(out / name) for name in _OUTPUTS)}")
    return 0
