"""Fine-grained metric definitions on hand-made transition tables, intervals, result objects."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vlm_probe.errors import VLMProbeError
from vlm_probe.evaluation import EvalRun, FineGrained, fine_grained_metrics, m_rea, m_v2r, m_vis, transition_table
from vlm_probe.results import Result
from vlm_probe.stats import bootstrap


def _pairs_from_table(both: int, a_only: int, b_only: int, neither: int, seed: int = 0):
    """Correctness under conditions a and b realising a given 2x2 table, in shuffled item order."""
    a = [True] * both + [True] * a_only + [False] * b_only + [False] * neither
    b = [True] * both + [False] * a_only + [True] * b_only + [False] * neither
    order = np.random.default_rng(seed).permutation(len(a))
    return np.array(a)[order], np.array(b)[order]


TABLES = [(20, 34, 6, 40), (29, 10, 3, 58), (0, 0, 0, 7), (5, 0, 0, 0), (1, 2, 3, 4)]


@pytest.mark.parametrize("table", TABLES)
def test_transition_table_and_metric_definitions(table) -> None:
    both, a_only, b_only, neither = table
    n = sum(table)
    image, other = _pairs_from_table(*table)
    t = transition_table(image, other)
    assert (t.both, t.a_only, t.b_only, t.neither, t.n) == (*table, n)
    assert t.a_accuracy == pytest.approx((both + a_only) / n)
    assert t.b_accuracy == pytest.approx((both + b_only) / n)
    # M_vis: correct with the image AND wrong with the blank image
    vis, vis_table = m_vis(image, other)
    assert vis.value == pytest.approx(a_only / n) and vis_table == t
    # M_v2r: correct with the image AND with blank image + description
    v2r, _ = m_v2r(image, other)
    assert v2r.value == pytest.approx(both / n)
    assert m_rea(image).value == pytest.approx((both + a_only) / n)
    for estimate in (vis, v2r):
        assert estimate.low <= estimate.value <= estimate.high and estimate.n == n


def test_published_scale_example() -> None:
    """A table reproducing the published IN numbers (M_vis 34.0 of 100 items)."""
    image, blank = _pairs_from_table(20, 34, 6, 40)
    vis, table = m_vis(image, blank)
    assert 100 * vis.value == pytest.approx(34.0)
    assert table.to_frame("image", "blank").loc["image correct", "blank wrong"] == 34
    # the interval agrees with the normal approximation sqrt(p(1-p)/n) to within resampling noise
    half = 1.96 * math.sqrt(0.34 * 0.66 / 100)
    assert vis.high - vis.low == pytest.approx(2 * half, rel=0.15)
    assert vis == bootstrap((image & ~blank).astype(float))  # same resampling as stats.bootstrap


def test_pairing_by_id_excludes_unmatched_items() -> None:
    image = pd.Series([True, True, False, True], index=["a", "b", "c", "d"])
    blank = pd.Series([False, True, False], index=["d", "b", "a"])
    t = transition_table(image, blank)
    # paired items: a (T, F), b (T, T), d (T, F); c has no blank row
    assert (t.both, t.a_only, t.b_only, t.neither) == (1, 2, 0, 0)
    with pytest.raises(ValueError, match="one value per item"):
        transition_table([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        transition_table([0.5, 1.0], [1.0, 1.0])


def _rows(condition: str, correct: list[bool | None], prefix: str = "q") -> list[dict]:
    rows = []
    for i, c in enumerate(correct):
        rows.append({"condition": condition, "index": i, "id": f"{prefix}{i}", "status": "ok" if c is not None
                     else "error", "error": None if c is not None else "image: truncated", "correct": c,
                     "category": "cat" if i % 2 else "dog", "answer": "1"})
    return rows


def test_fine_grained_metrics_from_runs_with_failures() -> None:
    # general: item q4 failed in both conditions, q5 only under "blank"
    general = EvalRun.from_rows(
        _rows("image", [True, True, False, True, None, True]) + _rows("blank", [False, True, False, True, None, None])
    )
    math_run = EvalRun.from_rows(_rows("image", [True, True, False]) + _rows("description", [True, False, False]))
    text_run = EvalRun.from_rows(_rows("text", [True, False, True, None]))
    result = fine_grained_metrics(general=general, math=math_run, reasoning=text_run, model="IN", n_resamples=500)
    frame = result.to_frame().set_index("metric")
    # M_vis over q0..q3: image/blank = (T,F) (T,T) (F,F) (T,T) -> 1 of 4
    assert frame.loc["M_vis", "value"] == pytest.approx(0.25) and frame.loc["M_vis", "n"] == 4
    assert frame.loc["M_vis", "excluded"] == 2
    assert result.transitions("M_vis").as_dict() == {"both": 2, "a_only": 1, "b_only": 0, "neither": 1}
    # M_v2r: (T,T) (T,F) (F,F) -> 1 of 3
    assert frame.loc["M_v2r", "value"] == pytest.approx(1 / 3)
    assert result.transitions("M_v2r").as_dict() == {"both": 1, "a_only": 1, "b_only": 0, "neither": 1}
    # M_rea: 2 of 3 that ran
    assert frame.loc["M_rea", "value"] == pytest.approx(2 / 3) and frame.loc["M_rea", "excluded"] == 1
    # the accuracies next to M_vis count its items only (q0..q3): q5, run under image alone, is not one of them
    assert frame.loc["accuracy:general:image", "value"] == pytest.approx(3 / 4)
    assert frame.loc["accuracy:general:blank", "value"] == pytest.approx(2 / 4)
    general_rows = frame.loc[["M_vis", "accuracy:general:image", "accuracy:general:blank"]]
    assert general_rows["n"].tolist() == [4, 4, 4] and general_rows["excluded"].tolist() == [2, 2, 2]
    assert set(general_rows["population"]) == {"items run under both image and blank"}
    table = result.transitions("M_vis")
    assert frame.loc["accuracy:general:image", "value"] == pytest.approx(table.a_accuracy)
    assert frame.loc["accuracy:general:blank", "value"] == pytest.approx(table.b_accuracy)
    assert frame.loc["M_rea", "population"] == "items run under text"
    assert (frame["low"] <= frame["value"]).all() and (frame["value"] <= frame["high"]).all()
    headline = result.metrics()
    assert list(headline["metric"]) == ["M_vis", "M_v2r", "M_rea"]
    assert headline["value"].iloc[0] == pytest.approx(25.0)


def test_fine_grained_result_roundtrip_concat_and_plot(tmp_path) -> None:
    def run(flips):
        return EvalRun.from_rows(_rows("image", [True] * 6 + [False] * 4)
                                 + _rows("blank", [False] * flips + [True] * (10 - flips)))

    a = fine_grained_metrics(general=run(3), model="IN", n_resamples=200)
    b = fine_grained_metrics(general=run(5), model="RL", n_resamples=200)
    both = FineGrained.concat([a, b])
    both.save(tmp_path / "fg")
    back = Result.load(tmp_path / "fg")
    assert isinstance(back, FineGrained)
    pd.testing.assert_frame_equal(back.to_frame(), both.to_frame())
    assert back.transitions("M_vis", model="RL").a_only == 5
    fig = back.plot()
    assert [trace.name for trace in fig.data] == ["IN", "RL"]
    assert list(fig.data[1].y) == pytest.approx([50.0])
    with pytest.raises(VLMProbeError, match="at least one"):
        fine_grained_metrics()
    with pytest.raises(VLMProbeError, match="no rows for condition 'description'"):
        fine_grained_metrics(math=run(1))


def test_eval_run_accuracy_groups_and_failures(tmp_path) -> None:
    run = EvalRun.from_rows(_rows("image", [True, False, True, None]) + _rows("blank", [False, False, True, True]))
    table = run.accuracy()
    assert list(table["condition"]) == ["image", "blank"]
    assert table["accuracy"].tolist() == pytest.approx([2 / 3, 2 / 4])
    assert table["failed"].tolist() == [1, 0]
    by_category = run.accuracy("category").set_index(["condition", "category"])
    assert by_category.loc[("image", "dog"), "accuracy"] == pytest.approx(1.0)  # q0, q2
    assert by_category.loc[("image", "cat"), "n"] == 1  # q1 (q3 failed)
    assert run.failures()["id"].tolist() == ["q3"]
    assert run.transitions("image", "blank").as_dict() == {"both": 1, "a_only": 1, "b_only": 0, "neither": 1}
    run.save(tmp_path / "r")
    back = Result.load(tmp_path / "r")
    pd.testing.assert_frame_equal(back.to_frame(), run.to_frame())
    assert len(back.plot().data) == 1
