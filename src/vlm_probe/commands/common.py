"""Shared pieces of the subcommands: model options, layer lists, writing figures and tables."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_write_text


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

    if not Path(path).exists() and "/" not in path:
        raise InputError(f"{path} is neither a checkpoint directory nor a hub id (org/name).")
    if not args.quiet:
        return load(path, **model_options(args))
    with hf_progress_bars(False):
        return load(path, **model_options(args))


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,4,8"`` or ``"0-27"`` (inclusive) -> list of 0-based decoder layers."""
    if not text:
        return None
    layers: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            start, stop = part.split("-", 1)
            layers += list(range(int(start), int(stop) + 1))
        else:
            layers.append(int(part))
    return layers


def write_figure(fig: Any, path: Path) -> Path:
    """A self-contained HTML file (plotly.js inlined), written atomically."""
    atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))
    return path
