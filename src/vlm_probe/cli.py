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
from .threads import torch_threads

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


#: One thread policy for every subcommand (see :mod:`vlm_probe.threads`).
THREADS_HELP = ("torch CPU threads (default: vlm_probe.threads.default_threads(): $VLM_PROBE_THREADS, else a core "
                "left per busy process, at most half the cores)")


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
        if each.get_default("func") and "--threads" not in each._option_string_actions:
            each.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
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
        with torch_threads(getattr(args, "threads", None)):
            return int(args.func(args) or 0)
    except VLMProbeError as error:
        print(f"vlm-probe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
