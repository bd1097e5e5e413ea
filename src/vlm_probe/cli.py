"""The ``vlm-probe`` command: thin front-ends over the library.

Each capability registers its subcommand in its own ``commands`` module
(``register(subparsers)`` adds a parser whose ``func`` runs it); this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .errors import VLMProbeError

#: Modules that register subcommands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "commands.analyze",
    "weights.commands",
    "evaluation.commands",
    "commands.probes",
    "commands.surgery",
    "testbed.commands",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-probe",
        description="Localize what RL changed in a vision-language model (IN vs RL checkpoints).",
    )
    parser.add_argument("--version", action="version", version=f"vlm_probe {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlm_probe.{name}").register(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except VLMProbeError as error:
        print(f"vlm-probe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
