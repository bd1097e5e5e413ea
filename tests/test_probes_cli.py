"""The published probes on real swap pairs through the harness, and their CLI front-ends."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import vlm_probe
from vlm_probe.cli import main
from vlm_probe.evaluation import grade, load_swap_pairs, load_text
from vlm_probe.evaluation.probes import ablation_localization, swap_localization
from vlm_probe.results import Result

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vision_swap_pairs"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"swap-pair data not found at {SHARED}")


@needs_data
def test_swap_localization_grades_with_the_harness(qwen) -> None:
    pairs = load_swap_pairs(SHARED / "grounding", limit=2)
    result = swap_localization(qwen, pairs, layers=[0, 3], max_new_tokens=4, progress=False)
    frame = result.frame
    assert set(frame["task"]) == {"grounding"} and len(frame) == 4
    for _, row in frame.iterrows():
        pair = pairs[int(row["sample"])]
        assert row["id"] == pair.id
        assert row["target_correct"] == pair.grade(row["answer"], "target").correct
        assert row["flipped_to_source"] == pair.grade(row["answer"], "source").correct
    assert {"changed", "changed_low", "changed_high"} <= set(result.rates().columns)


def test_ablation_localization_on_text_items(qwen, tmp_path) -> None:
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"t{i}", "question": f"what is {i} plus {i} ?", "answer": str(2 * i)})
                              for i in range(3)) + "\n")
    items = load_text(data)
    result = ablation_localization(qwen, items, layers=[1, 2], max_new_tokens=3, progress=False)
    frame = result.frame
    assert set(frame["layer"]) == {-1, 1, 2}
    for _, row in frame.iterrows():
        assert row["correct"] == grade(row["answer"], items[int(row["sample"])].answer).correct


@needs_data
def test_swap_and_ablate_commands(tmp_path, zoo) -> None:
    model = zoo("qwen2_5_vl").save(tmp_path / "model")
    out = tmp_path / "out"
    code = main(["swap", str(model), "--data", str(SHARED / "counting"), "--limit", "2", "--layers", "0,2",
                 "--out", str(out), "--max-new-tokens", "3", "-q"])
    assert code == 0
    saved = Result.load(out / "swap")
    assert sorted(saved.frame["layer"].unique()) == [0, 2]
    html = (out / "swap.html").read_text()
    assert "Plotly.newPlot" in html and not re.search(r"<script[^>]+src=", html), "figure must be self-contained"
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "what is 1 plus 1 ?", "answer": "2"}) + "\n")
    assert main(["ablate", str(model), "--data", str(data), "--out", str(tmp_path / "abl"), "--layers", "0-1",
                 "--max-new-tokens", "2", "-q"]) == 0
    assert (tmp_path / "abl" / "ablation.html").is_file()


def test_commands_fail_clearly_on_bad_input(tmp_path, capsys) -> None:
    assert main(["swap", str(tmp_path / "missing"), "--data", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "no such dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["swap", "--help"])
    assert "example:" in capsys.readouterr().out
