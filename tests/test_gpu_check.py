"""benchmarks/gpu_check.py --small: tiny versions of the real configurations on the CPU, every
check passes; with --perturb (a documented self-test option) the equality checks fail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check

        yield gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))


def _run(module, tmp_path: Path, *args: str) -> tuple[int, list[dict]]:
    out = tmp_path / "table.json"
    code = module.main(["--small", "--json", str(out), "--tmp", str(tmp_path), *args])
    return code, json.loads(out.read_text())


def test_small_run_passes_every_check(gpu_check, tmp_path) -> None:
    code, rows = _run(gpu_check, tmp_path)
    assert code == 0
    checked = {(r["model"], r["check"]) for r in rows if r["ok"] is True}
    for model in gpu_check.REAL:
        for check in ("noop", "patching", "swap", "mass"):
            assert (model, check) in checked, (model, check)
        for check in ("tracing", "attribution"):
            assert any(r["model"] == model and r["check"] == check and r["ok"] is None for r in rows)
    assert ("qwen2.5-vl-3b", "device_map") in checked
    assert ("trio", "spectra") in checked
    assert not [r for r in rows if r["ok"] is False]


def test_a_perturbed_reference_fails_the_equality_checks(gpu_check, tmp_path) -> None:
    code, rows = _run(gpu_check, tmp_path, "--models", "qwen2.5-vl-3b", "--checks", "noop", "device_map", "spectra",
                      "--perturb", "0.5")
    assert code == 1
    assert {r["check"]: r["ok"] for r in rows} == {"noop": False, "device_map": False, "spectra": False}
