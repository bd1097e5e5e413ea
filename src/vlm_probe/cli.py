"""The ``vlm-probe`` command: thin front-ends over the library.

Each subcommand lives in a module of :mod:`vlm_probe.commands` (``register(subparsers)`` adds a
parser whose ``func`` runs it); this file only assembles them. No library module imports the command-line code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .commands.common import HelpFormatter
from .errors import VLMProbeError

#: Modules that register subcommands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "commands.analyze",
    "commands.weights",
    "commands.eval",
    "commands.probes",
    "commands.surgery",
    "commands.report",
    "commands.testbed",
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
    for each in _parsers(parser):  # every option's help shows its default
        each.formatter_class = HelpFormatter
    return parser


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and every subcommand parser below it."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += _parsers(child)
    return found


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
