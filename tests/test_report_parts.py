"""The main job's parts on hand-made inputs: data discovery, generation budget, stratified samples,
the answer-first sentences, the figure checks and the skipped-section rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

from vlm_probe.arch.regions import Cuts
from vlm_probe.errors import InputError
from vlm_probe.report.claims import ClaimParameters, judge
from vlm_probe.report.figures import band_figure, check_figure
from vlm_probe.report.html import Section
from vlm_probe.report.inputs import (
    DEFAULT_MAX_NEW_TOKENS,
    Inputs,
    describe_sample,
    find_data,
    read_manifest,
    stratified,
)
from vlm_probe.report.summary import answer_first


def _inputs(tmp_path: Path, manifest: dict | None) -> Inputs:
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return Inputs({}, {}, None, read_manifest(tmp_path), tmp_path)


@pytest.mark.parametrize("given, manifest, expected, source", [
    (None, None, DEFAULT_MAX_NEW_TOKENS, "the default"),
    (None, {"generation": {"max_new_tokens": 20}}, 20, "generation.max_new_tokens"),
    (None, {"max_new_tokens": 12}, 12, "manifest.json max_new_tokens"),
    (None, {"generation": {"max_new_tokens": 20}, "max_new_tokens": 12}, 20, "generation"),
    (5, {"generation": {"max_new_tokens": 20}}, 5, "--max-new-tokens"),
])
def test_generation_budget_precedence(tmp_path, given, manifest, expected, source) -> None:
    value, where = _inputs(tmp_path, manifest).max_new_tokens(given)
    assert value == expected and source in where
    assert DEFAULT_MAX_NEW_TOKENS >= 24  # room for a short reasoning trace


@pytest.mark.parametrize("manifest", [{"generation": {"max_new_tokens": 0}}, {"max_new_tokens": "32"},
                                      {"max_new_tokens": True}])
def test_bad_generation_budget_is_refused(tmp_path, manifest) -> None:
    with pytest.raises(InputError, match="must be a positive integer"):
        _inputs(tmp_path, manifest).max_new_tokens(None)


def test_bad_manifest_is_refused(tmp_path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_find_data_roles_and_the_published_layout(tmp_path) -> None:
    (tmp_path / "v2r.jsonl").write_text("")
    (tmp_path / "text.jsonl").write_text("")
    assert set(find_data(tmp_path)) == {"math", "reasoning"}
    published = tmp_path / "pairs"
    (published / "ocr").mkdir(parents=True)
    (published / "ocr" / "data.jsonl").write_text("")
    assert find_data(published) == {"swap": published}


@dataclass(frozen=True)
class _Item:
    id: str
    task: str


@dataclass(frozen=True)
class _Data:
    items: tuple

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


def test_stratified_samples_take_every_task_in_turn() -> None:
    items = tuple(_Item(f"a{i}", "a") for i in range(6)) + tuple(_Item(f"b{i}", "b") for i in range(2)) + \
        tuple(_Item(f"c{i}", "c") for i in range(3))
    data = _Data(items)
    chosen = stratified(data, 6).items
    assert [x.id for x in chosen] == ["a0", "a1", "b0", "b1", "c0", "c1"]  # file order kept
    assert stratified(data, None) is data and stratified(data, 50) is data
    assert describe_sample(chosen, "pairs", total=11) == "n = 6 pairs (a 2, b 2, c 2) of 11, task-stratified"
    with pytest.raises(InputError, match="positive"):
        stratified(data, 0)


def _tables() -> dict[str, pd.DataFrame]:
    items = []
    for i in range(8):
        for variant, v2r in (("IN", 0.0), ("RL", 1.0), ("IN:RL:RL", 1.0)):
            items.append({"variant": variant, "host": "IN", "metric": "M_v2r", "id": f"q{i}", "value": v2r})
    restored = pd.DataFrame({"receiver": "IN", "donor": "RL", "direction": "RL -> IN", "layer": range(6),
                             "unified_layer": range(1, 7), "restored": [0.05, 0.1, 0.15, 0.7, 0.95, 1.0],
                             "low": 0.0, "high": 1.0, "n": 8})
    tensors = pd.DataFrame([{"step": "IN->RL", "region": r, "energy": e, "numel": 1}
                            for r, e in (("early", 1.0), ("mid", 3.0), ("late", 4.0))])
    return {"transfer_items": pd.DataFrame(items), "cross_patching_restored": restored, "weights_tensors": tensors}


def test_answer_first_from_hand_made_tables() -> None:
    tables = _tables()
    cuts = Cuts.make(None, 6)
    params = ClaimParameters(n_resamples=200)
    claims = judge(tables, cuts=cuts, params=params)
    gain, where = answer_first(tables, claims, cuts, params)
    assert gain.startswith("RL changes vision-to-reasoning (M_v2r) by +100.0 points [+100.0, +100.0] (n=8)")
    # layers L4 (0.15 -> 0.70) carries more than half of the difference on its own
    assert "arises in decoder layer L4: patching RL's residual stream into IN after L4 restores 70%" in where
    assert "after L3 15%" in where
    assert "puts 88% of its decoder energy in the mid and late layers (L3-L6), which hold 67%" in where
    assert where.endswith(f"(claim \"changes concentrate in mid-to-late layers\": {claims[0].verdict.value}).")


def test_answer_first_says_what_is_missing() -> None:
    claims = judge({}, cuts=None)
    sentences = answer_first({}, claims, None)
    assert len(sentences) == 2
    assert "no graded items" in sentences[0] and "perception.jsonl" in sentences[0]
    assert "does not say where RL acts" in sentences[1]


def test_figure_checks_catch_what_readers_hit() -> None:
    frame = pd.DataFrame({"unified_layer": [1, 2, 3], "y": [0.1, 0.2, 0.3], "lo": 0.0, "hi": 0.5, "s": "IN"})
    good = band_figure(frame, y="y", low="lo", high="hi", series="s", title="t", y_title="accuracy")
    assert check_figure(good) == []
    assert list(good.layout.xaxis.tickvals) == [1, 2, 3] and list(good.layout.xaxis.ticktext) == ["L1", "L2", "L3"]
    bare = go.Figure(go.Scatter(x=[1, 2], y=[1, 2]))
    problems = check_figure(bare)
    assert "not on the white template" in problems and "xaxis has no title" in problems
    bare.update_layout(template="plotly_white", xaxis_title="layer (unified index)", yaxis_title="y")
    assert check_figure(bare) == ["xaxis: layer axis without integer ticks"]


def test_skipped_sections_say_why_and_how_to_run_them() -> None:
    html = Section("ablation", "Layer ablation", status="skipped", reason="needs text.jsonl.",
                   enable="--data with text.jsonl").html()
    assert "Skipped: needs text.jsonl. To run it: --data with text.jsonl." in html
    failed = Section("swap", "Swap", status="failed", reason="ValueError: boom").html()
    assert "This analysis failed: ValueError: boom" in failed


def test_pooled_prompts_describe_the_sample_that_runs(tmp_path, zoo) -> None:
    from vlm_probe.report.pipeline import Options, Pipeline

    zoo("qwen2_5_vl").image(0).save(tmp_path / "img.png")
    for name, tasks in (("perception.jsonl", ("count", "color")), ("v2r.jsonl", ("plus", "minus"))):
        rows = [{"id": f"{name}{i}", "question": "how many ?", "image": "img.png", "answer": "1",
                 "description": "one circle", "task": tasks[i % 2]} for i in range(4)]
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    inputs = Inputs({}, find_data(tmp_path), None, {}, tmp_path)
    pipeline = Pipeline(inputs, tmp_path / "out", Options())
    requests, described = pipeline.prompts(3, images=True)
    assert len(requests) == 3
    counts = [int(text.split()[2]) for text in described]
    assert sum(counts) == 3 and all(text.endswith("task-stratified") for text in described), described
    everything, described = pipeline.prompts(None, images=True)
    assert len(everything) == 8 and described == ["n = 4 math VQA items (minus 2, plus 2)",
                                                  "n = 4 general VQA items (color 2, count 2)"]


def test_answer_first_claims_no_move_without_a_swap_signal() -> None:
    rows = [{"sample": s, "layer": k, "changed": False} for s in range(6) for k in range(4)]
    tables = {"swap_IN": pd.DataFrame(rows), "swap_RL": pd.DataFrame(rows)}
    claims = judge(tables, cuts=Cuts.make(None, 4), params=ClaimParameters(n_resamples=50))
    sentence = answer_first(tables, claims, Cuts.make(None, 4))[-1]
    assert "too few answers" in sentence and "moves" not in sentence and "stays" not in sentence


def test_prompt_sections_skip_without_their_prompts_and_record_their_sample(tmp_path) -> None:
    from vlm_probe.report.pipeline import Options, Pipeline, SectionRecord, Skip

    rows = [{"id": f"t{i}", "question": f"what is {i} plus 1 ?", "answer": str(i + 1), "category": "text"}
            for i in range(5)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pipeline = Pipeline(Inputs({}, find_data(tmp_path), None, {}, tmp_path), tmp_path / "out", Options(samples=3))
    record = SectionRecord("attention", "Attention")
    with pytest.raises(Skip, match="Attention on the image needs prompts with images") as info:
        pipeline.section_prompts(record, "Attention on the image", images=True)
    assert "VQA items" in info.value.enable and record.samples == []
    record = SectionRecord("lens", "Lens")
    requests = pipeline.section_prompts(record, "The logit lens", images=False)
    assert len(requests) == 3
    assert all(any(row["question"] in r.prompt for row in rows) for r in requests)
    assert record.samples and "n = 3 text items" in record.samples[0]


def test_answer_first_names_the_margin_when_a_moved_transition_counts_as_unchanged() -> None:
    """A transition one layer earlier in RL, within the +-1 layer margin of a 6-layer decoder, is
    "unchanged: supported"; the sentence says the margin it was judged by."""

    def sweep(transition: int) -> pd.DataFrame:  # answers change when the swap starts before the transition
        return pd.DataFrame([{"sample": s, "layer": k, "changed": k < transition} for s in range(20) for k in range(6)])

    tables = {"swap_IN": sweep(4), "swap_RL": sweep(3)}
    claims = judge(tables, cuts=Cuts.make(None, 6), params=ClaimParameters(n_resamples=50))
    sentence = answer_first(tables, claims, Cuts.make(None, 6))[-1]
    assert "moves from L5 to L4" in sentence and "supported; equivalence margin +-1 layer(s)" in sentence, sentence
