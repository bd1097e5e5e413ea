"""``vlm-probe report OUT``: draw report.html again from a finished run's tables and run.json."""

from __future__ import annotations

import argparse

EXAMPLE = """example:
  vlm-probe report vlm_probe_out/      # after vlm-probe analyze --out vlm_probe_out/"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("report", help="redraw report.html from a finished analyze run",
                            description="Read run.json and the *.parquet tables of `vlm-probe analyze` and write "
                            "report.html again (no model is loaded, no claim is judged again).", epilog=EXAMPLE)
    parser.add_argument("out", help="the --out folder of vlm-probe analyze")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report.render import render

    print(f"wrote {render(args.out)}")
    return 0
