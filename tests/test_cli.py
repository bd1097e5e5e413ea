"""The command line: every option documented with its default; argparse code only under commands/."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

import vlm_probe
from vlm_probe.cli import _parsers, build_parser, main

PACKAGE = Path(vlm_probe.__file__).parent
ARGPARSE_ALLOWED = {"cli.py"}


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                             argparse._SubParsersAction)):
            yield action


def test_every_option_has_help_and_says_its_default() -> None:
    parsers = _parsers(build_parser())
    assert len(parsers) > 8
    missing = []
    for parser in parsers:
        text = parser.format_help()
        for action in _options(parser):
            if not action.help:
                missing.append(f"{parser.prog} {action.option_strings[0]}: no help")
                continue
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            rendered = parser._get_formatter()._get_help_string(action) % vars(action) if "%" in (
                parser._get_formatter()._get_help_string(action)) else parser._get_formatter()._get_help_string(action)
            if not (flag or action.required or "default" in rendered or "required" in rendered):
                missing.append(f"{parser.prog} {action.option_strings[0]}: default not shown")
        assert "(default: %(default)s)" not in text, parser.prog
    assert not missing, "\n".join(missing)


def test_help_of_analyze_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    text = capsys.readouterr().out
    assert "(default: vlm_probe_out)" in text and "examples:" in text


def test_argparse_lives_under_commands_and_nothing_imports_the_cli() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                if name == "argparse" and not relative.startswith("commands/") and relative not in ARGPARSE_ALLOWED:
                    offenders.append(f"{relative} imports argparse")
                upward = name.lstrip(".").split(".")[0] in ("commands", "cli") and name.startswith("..") \
                    or name.startswith(("vlm_probe.commands", "vlm_probe.cli"))
                if upward and not relative.startswith("commands/") and relative != "cli.py":
                    offenders.append(f"{relative} imports {name}")
    assert not offenders, offenders


def test_every_command_takes_threads_and_runs_under_one_thread_policy(capsys, monkeypatch) -> None:
    leaves = [p for p in _parsers(build_parser()) if p.get_default("func")]
    assert len(leaves) > 8
    assert all("--threads" in p._option_string_actions for p in leaves), [p.prog for p in leaves]
    assert main(["report", "/nonexistent-run", "--threads", "0"]) == 2
    assert "threads must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("VLM_PROBE_THREADS", "two")
    assert main(["report", "/nonexistent-run"]) == 2
    assert "VLM_PROBE_THREADS='two'" in capsys.readouterr().err


def test_the_analyze_summary_keeps_every_line_within_the_terminal_width(monkeypatch) -> None:
    import io
    import os
    import shutil
    from types import SimpleNamespace

    from vlm_probe.commands.analyze import print_summary
    from vlm_probe.report.pipeline import SectionRecord

    width = 72
    monkeypatch.setattr(shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((width, 20)))
    long = "n = 1000 math VQA items (color_plus 200, count_not 200, count_plus 200, more_color 200, more_shape 200)"
    analysis = SimpleNamespace(
        summary=["RL changes vision-to-reasoning (M_v2r) by +31.4 points [+27.9, +34.9] (n=1000); " * 3],
        claims=[SimpleNamespace(verdict=SimpleNamespace(value="no difference shown"),
                                text="Attention from reasoning (generated) tokens to vision tokens rises " * 2)],
        sections=[SectionRecord("cross_patching", "Cross-checkpoint patching", samples=[long, long])],
        skipped=[SectionRecord("freezing", "Freezing", status="skipped", reason="It needs re-runs. " * 4,
                               enable="run without --in/--rl")],
        failures={}, timings={"inputs_and_testbed": 1.0, "analysis": 2.0}, out=Path("out"),
    )
    buffer = io.StringIO()
    print_summary(analysis, 0.0, file=buffer)
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines[:-1]) <= width  # the last line names the report's path
    sample_lines = lines[lines.index("Samples:") + 1:]
    assert sample_lines[0].startswith("  cross_patching n = 1000")
    assert sum(len(line) > width - 12 for line in sample_lines[:4]) >= 3  # continuations use the width too
