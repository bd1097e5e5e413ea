"""Shared pieces of the subcommands: model options, layer lists, writing figures and tables."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..arch import regions
from ..errors import InputError, RegionError
from ..io import atomic_write_text, check_writable_dir


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option's help ends with its default (``(default: X)``),
    unless the help already says it, the option is a flag, or it is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction,
                                   argparse._HelpAction, argparse._VersionAction))
        if not action.option_strings or flag or action.required or "default" in text or "required" in text:
            return text
        if action.default is None:
            return f"{text} (default: not set)"
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default=None,
                        help="parameter dtype: float32, bf16, fp16 or auto (default: the checkpoint's)")
    parser.add_argument("--device-map", default=None,
                        help="accelerate placement, e.g. auto or cuda:0 (default: everything on the CPU)")
    parser.add_argument("--attn", dest="attn_implementation", default=None,
                        help="attention backend: sdpa or eager (default: sdpa)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def check_model_options(args: argparse.Namespace) -> None:
    """``--dtype``, ``--attn`` and ``--device-map`` checked before anything is read or loaded."""
    from ..model.loading import check_load_options

    options = model_options(args)
    check_load_options(options["dtype"], None, options["attn_implementation"])
    try:
        check_load_options(None, args.device_map, None)
    except InputError as error:
        raise InputError(str(error).replace("device_map", "--device-map", 1)) from None


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """``load()`` keyword arguments from the options of :func:`add_model_options` (a single
    device such as ``cuda:0`` becomes ``{"": "cuda:0"}``)."""
    device_map = args.device_map
    if device_map and device_map not in ("auto", "balanced", "sequential"):
        device_map = {"": device_map}
    return {"dtype": args.dtype, "device_map": device_map, "attn_implementation": args.attn_implementation}


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own progress bars (weight loading, ...) on or off for the block, restored after."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def load_model(path: str, args: argparse.Namespace) -> Any:
    """``load(path)`` with the command's model options; ``-q`` silences transformers' loading bar."""
    from ..model.loading import load

    if not args.quiet:
        return load(path, **model_options(args))
    with hf_progress_bars(False):
        return load(path, **model_options(args))


_INT = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)-(-?\d+)")


def parse_layers(text: str | None, flag: str = "--layers") -> list[int] | None:
    """``"0,4,8"``, ``"0-27"`` (inclusive) or negative ones (``"-1"``, ``"-3--1"``, counted from the
    end by the analyses) -> list of 0-based decoder layers; a mistake is an :class:`InputError`
    naming ``flag``."""
    if text is None:
        return None
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if _INT.fullmatch(part):
            layers.append(int(part))
            continue
        match = _RANGE.fullmatch(part)
        if not match:
            raise InputError(f"{flag} {text!r}: {part!r} is not a layer or a range; use e.g. 0,4,8 or 0-27 or -1.")
        start, stop = int(match[1]), int(match[2])
        if (start < 0) != (stop < 0):
            raise InputError(f"{flag} {text!r}: the range {part!r} mixes a layer counted from the start with one "
                             "counted from the end; use 0-27 or -4--1.")
        if start > stop:
            raise InputError(f"{flag} {text!r}: the range {part!r} runs backwards; write it as {stop}-{start}.")
        layers += list(range(start, stop + 1))
    if len(set(layers)) != len(layers):
        raise InputError(f"{flag} {text!r} names some layer twice.")
    return layers


def parse_cuts(text: str | None, flag: str = "--cuts") -> tuple[int, int] | None:
    """``"9,18"`` -> ``(9, 18)`` (:func:`vlm_probe.arch.regions.parse_cuts`), the error naming ``flag``."""
    if text is None:
        return None
    try:
        return regions.parse_cuts(text)
    except RegionError as error:
        raise InputError(f"{flag}: {error}") from None


def _whole_number(text: str, minimum: int, wanted: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    return _whole_number(text, 1, "at least 1")


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer of at least 0."""
    return _whole_number(text, 0, "0 or more")


def check_out(path: str | None, flag: str = "--out", *, overwrite: bool = True, overwrite_flag: str = "--overwrite") -> None:
    """An output directory the command can create: not an existing file, under a writable directory
    (and, with ``overwrite=False``, not existing yet); checked before anything is loaded or written."""
    if path is None:
        return
    try:
        check_writable_dir(path, overwrite=overwrite, flag=overwrite_flag)
    except InputError as error:
        raise InputError(f"{flag}: {error}") from None


def check_out_file(path: str | None, flag: str) -> None:
    """An output file the command can write: not a directory, in a directory that can be created."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name.")
    check_out(str(target.parent), flag)


def check_in_file(path: str | None, flag: str) -> Path | None:
    """An input file that exists and is a file."""
    if path is None:
        return None
    target = Path(path)
    if not target.exists():
        raise InputError(f"{flag} {path} does not exist; check the path.")
    if not target.is_file():
        raise InputError(f"{flag} {path} is a directory; give the file.")
    return target


def write_figure(fig: Any, path: Path) -> Path:
    """A self-contained HTML file (plotly.js inlined), written atomically."""
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path
