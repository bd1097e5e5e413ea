"""``vlm-probe merge``: write a block merge between checkpoints (or export it for mergekit)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..io import atomic_write_text
from .common import check_in_file, check_out, check_out_file, parse_cuts

EXAMPLE = """examples:
  vlm-probe merge --ckpt IN=ckpt/in --ckpt RL=ckpt/rl --preset IN:RL:RL --cuts 9,18 --out merges/in-rl-rl
  vlm-probe merge --ckpt IN=ckpt/in --ckpt RL=ckpt/rl --plan plan.yaml --out merges/custom --mergekit mk.yml
A plan file (YAML): host: IN / rules: [{regions: [mid, late], source: RL, method: swap}] / cuts: [9, 18]"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("merge", help="write a merged checkpoint from a plan or a preset",
                            description="Transplant layer blocks (or interpolate) between checkpoints of one "
                            "architecture and write an ordinary HF checkpoint directory.",
                            epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", action="append", required=True, metavar="NAME=PATH",
                        help="a checkpoint and its name in the plan (repeat; required)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--plan", help="merge plan YAML (this or --preset is required)")
    which.add_argument("--preset", help="early:mid:late pattern, e.g. IN:RL:RL (this or --plan is required)")
    parser.add_argument("--host", default="early",
                        help="with --preset: the checkpoint that supplies everything outside the decoder layers "
                        "(vision tower, projector, embeddings, final norm, lm_head); 'early' takes the early "
                        "third's source, as the published splices do")
    parser.add_argument("--cuts", help="where mid and late start (0-based decoder layers), e.g. 9,18 "
                        "(default: the plan's, else N//3,2N//3)")
    parser.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite; required)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard written")
    parser.add_argument("--mergekit", metavar="FILE", help="also write the equivalent mergekit YAML here "
                        "(default: not written)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..weights.merge import open_all, parse_size, write_merge
    from ..weights.mergekit_export import mergekit_yaml
    from ..weights.plans import MergePlan, thirds_plan

    checkpoints: dict[str, str] = {}
    for item in args.ckpt:
        if "=" not in item:
            raise InputError(f"--ckpt takes NAME=PATH; got {item!r}.")
        name, path = item.split("=", 1)
        if not name:
            raise InputError(f"--ckpt {item!r} has no name; write NAME=PATH, e.g. --ckpt IN=ckpt/in.")
        if name in checkpoints:
            raise InputError(f"--ckpt {name} is given twice ({checkpoints[name]} and {path}); give each name once.")
        if not Path(path).is_dir():
            raise InputError(f"--ckpt {name}: {path} is not a directory.")
        checkpoints[name] = path
    cuts = parse_cuts(args.cuts)
    parse_size(args.max_shard_size, "--max-shard-size")
    check_out(args.out, overwrite=args.overwrite)
    check_out_file(args.mergekit, "--mergekit")
    if args.plan:
        plan = MergePlan.from_yaml(check_in_file(args.plan, "--plan").read_text())  # type: ignore[union-attr]
        if cuts is not None:
            plan = MergePlan(plan.host, plan.rules, cuts, plan.name)
    else:
        plan = thirds_plan(args.preset, host=args.host, cuts=cuts)
    opened = open_all(checkpoints)
    exported = mergekit_yaml(plan, opened) if args.mergekit else None  # a plan mergekit cannot express fails here
    out = write_merge(plan, opened, args.out, overwrite=args.overwrite, max_shard_size=args.max_shard_size,
                      progress=not args.quiet)
    print(f"wrote {out}")
    if exported is not None:
        atomic_write_text(args.mergekit, exported)
        print(f"wrote {args.mergekit}")
    return 0
