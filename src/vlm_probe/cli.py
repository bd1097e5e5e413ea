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
from typing import NoReturn

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


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error that points at ``--help`` (usage is not repeated)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vlm-probe",
        description="Localize what RL changed in a vision-language model (IN vs RL checkpoints).",
    )
    parser.add_argument("--version", action="version", version=f"vlm_probe {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(f"vlm_probe.{name}").register(sub)
    for each in _parsers(parser):  # every option's help shows its default
        each.formatter_class = HelpFormatter
        if each.get_default("func") and "--threads" not in each._option_string_actions:
            each.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
        if each is not parser:  # --debug also after the subcommand; SUPPRESS keeps a top-level --debug
            each.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                              help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")
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


#: set to 1 to see tracebacks (same as --debug)
DEBUG_ENV = "VLM_PROBE_DEBUG"
#: errors from the user's files and paths (a read-only or missing folder, a file in the way)
_USER_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user mistake prints one line and returns 2 (``--debug``: the traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    name = " ".join(filter(None, (args.command, getattr(args, "testbed_command", None))))
    try:
        if hasattr(args, "attn_implementation"):  # model options fail before any data is read
            from .commands.common import check_model_options

            check_model_options(args)
        with torch_threads(getattr(args, "threads", None)):
            return int(args.func(args) or 0)
    except (VLMProbeError, *_USER_OS_ERRORS) as error:
        if debug:
            raise
        _print_error(name, error, hint=f"add --debug (or set {DEBUG_ENV}=1) for the traceback"
                     if not isinstance(error, VLMProbeError) else "")
        return 2
    except KeyboardInterrupt:
        print(f"vlm-probe {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug, not a user mistake: one line, the traceback on request
        if debug:
            raise
        _print_error(name, error, hint=f"this looks like a bug in vlm_probe; rerun with --debug (or "
                     f"{DEBUG_ENV}=1) and report the traceback", internal=True)
        return 1


def _print_error(command: str, error: BaseException, hint: str = "", internal: bool = False) -> None:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}; check the path and its permissions"
    if internal:
        text = f"{type(error).__name__}: {text}"
    print(f"vlm-probe {command}: error: {text}" + (f" ({hint})" if hint else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
