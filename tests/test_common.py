"""Shared utilities: atomic writes, resumable logs, results, bootstrap intervals."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from vlm_probe.errors import VLMProbeError
from vlm_probe.io import JsonlLog, atomic_directory, atomic_write_text
from vlm_probe.results import Result
from vlm_probe.stats import bootstrap, paired_difference


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path) -> None:
    target = tmp_path / "a.txt"
    atomic_write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("crash")
    assert not (tmp_path / "d").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"], "no temporary leftovers"
    assert target.read_text() == "first"


def test_atomic_directory_refuses_overwrite(tmp_path) -> None:
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(VLMProbeError, match="overwrite=True"):
        with atomic_directory(tmp_path / "d"):
            pass
    with atomic_directory(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "x").write_text("2")
    assert (tmp_path / "d" / "x").read_text() == "2"


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path) -> None:
    """Temporary files start private (0600); what lands must be readable like any new file."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain_dir").mkdir()
    atomic_write_text(tmp_path / "atomic.txt", "x")
    with atomic_directory(tmp_path / "atomic_dir") as tmp:
        atomic_write_text(tmp / "inside.txt", "x")
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "atomic.txt") == mode(plain)
    assert mode(tmp_path / "atomic_dir" / "inside.txt") == mode(plain)
    assert mode(tmp_path / "atomic_dir") == mode(tmp_path / "plain_dir")


def test_jsonl_log_ignores_and_repairs_a_torn_line(tmp_path) -> None:
    log = JsonlLog(tmp_path / "run.jsonl")
    log.append({"id": 1, "ok": True})
    with open(log.path, "a") as f:
        f.write('{"id": 2, "ok": tr')  # killed mid-write
    assert log.done() == {1}
    log.append({"id": 2, "ok": False})
    assert [r["id"] for r in log.read()] == [1, 2]


class _Demo(Result):
    kind = "demo_result"


def test_result_roundtrip(tmp_path) -> None:
    result = _Demo(pd.DataFrame({"layer": [1, 2], "value": [0.5, 0.25]}), {"note": "x"})
    result.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    assert isinstance(back, _Demo)
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())
    assert back.meta == {"note": "x"}


def test_bootstrap_interval_covers_and_matches_hand_computation() -> None:
    values = np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=float)
    est = bootstrap(values, n_resamples=4000, seed=3)
    assert est.value == pytest.approx(0.7)
    assert est.low < 0.7 < est.high
    # normal approximation sd = sqrt(p(1-p)/n) ~ 0.145: the 95% interval is about +-0.28
    assert 0.15 < est.high - est.low < 0.7
    diff = paired_difference([0, 0, 1, 0], [1, 1, 1, 0], seed=1)
    assert diff.value == pytest.approx(0.5)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
