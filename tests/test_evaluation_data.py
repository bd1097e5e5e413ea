"""Evaluation datasets: the published swap-pair layout, VQA and text items, image validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_probe.errors import DatasetError
from vlm_probe.evaluation import (
    build_requests,
    load_dataset,
    load_swap_pairs,
    load_text,
    load_vqa,
    validate_image,
)
from vlm_probe.evaluation.conditions import PromptFormat
from vlm_probe.evaluation.datasets import ImageLoadError, pair_answer_key

ROOT = Path(__file__).resolve().parents[1]
SWAP_PAIRS = ROOT.parent / "shared" / "data" / "vision_swap_pairs"
needs_pairs = pytest.mark.skipif(
    not SWAP_PAIRS.is_dir(), reason=f"the published swap-pair subset is not at {SWAP_PAIRS} (shared/data is absent)"
)


def _write_image(path: Path, size=(40, 30), color=(10, 200, 30)) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _vqa_file(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    _write_image(images / "ok.png")
    _write_image(images / "wide.png", size=(64, 20))
    good = images / "ok.png"
    (images / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (images / "not_image.png").write_text("this is not a png")
    records = [
        {"id": "a", "question": "How many?", "image": "images/ok.png", "answer": "3", "category": "count",
         "description": "three dots"},
        {"id": "b", "question": "Which shape?", "image": "images/wide.png", "answer": "B",
         "choices": ["circle", "square"], "description": "a square"},
        {"id": "c", "question": "How many?", "image": "images/truncated.png", "answer": "2"},
        {"id": "d", "question": "How many?", "image": "images/not_image.png", "answer": "2"},
        {"id": "e", "question": "How many?", "image": "images/missing.png", "answer": "2"},
    ]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@needs_pairs
def test_published_swap_pairs_load_with_task_specific_answer_keys() -> None:
    pairs = load_swap_pairs(SWAP_PAIRS)
    assert pairs.kind == "swap" and not pairs.failures
    by_task = {}
    for pair in pairs:
        by_task.setdefault(pair.task, []).append(pair)
    assert sorted(by_task) == ["counting", "grounding"]
    assert len(by_task["counting"]) == 30 and len(by_task["grounding"]) == 100
    first = by_task["counting"][0]
    raw = json.loads((SWAP_PAIRS / "counting" / "data.jsonl").read_text().splitlines()[0])
    assert first.id == raw["id"] and first.prompt == raw["prompt"]
    assert (first.target_answer, first.source_answer) == (raw["meta"]["target_answer"], raw["meta"]["source_answer"])
    assert first.target_image.path == SWAP_PAIRS / "counting" / raw["target_image"]
    assert first.target_image.size == first.source_image.size == (480, 320)
    box_pair = by_task["grounding"][0]
    raw = json.loads((SWAP_PAIRS / "grounding" / "data.jsonl").read_text().splitlines()[0])
    assert box_pair.answer_key == "bbox_xyxy" and box_pair.kind == "box"
    assert list(box_pair.target_answer) == raw["meta"]["target_bbox_xyxy"]
    assert box_pair.iou_threshold == raw["meta"]["iou_threshold"]
    assert box_pair.grade(str(raw["meta"]["target_bbox_xyxy"])).correct
    assert box_pair.grade(str(raw["meta"]["source_bbox_xyxy"]), which="source").correct
    # a single task folder and the generic loader read the same pairs
    assert [p.id for p in load_dataset(SWAP_PAIRS / "counting")] == [p.id for p in by_task["counting"]]


@needs_pairs
def test_swap_requests_carry_the_prompt_marker_and_the_right_answer() -> None:
    pairs = load_swap_pairs(SWAP_PAIRS / "counting", limit=3)
    target, source = build_requests(pairs, "target"), build_requests(pairs, "source")
    assert target[0].prompt == pairs[0].prompt and "<image>" in target[0].prompt
    assert target[0].answer == pairs[0].target_answer and source[0].answer == pairs[0].source_answer
    assert target[0].images[0].path != source[0].images[0].path


def test_pair_answer_keys_are_found_or_asked_for() -> None:
    assert pair_answer_key({"target_answer": "3", "source_answer": "4", "target_index": 1, "source_index": 2}) == \
        "answer"
    assert pair_answer_key({"target_bbox_xyxy": [0] * 4, "source_bbox_xyxy": [1] * 4}) == "bbox_xyxy"
    assert pair_answer_key({"target_ocr_string": "a", "source_ocr_string": "b", "target_index": 0,
                            "source_index": 1}) == "ocr_string"
    with pytest.raises(DatasetError, match="answer_keys"):
        pair_answer_key({"target_index": 1, "source_index": 2, "object_name": "x"}, "recognition")


def test_unreadable_images_become_recorded_failures(tmp_path) -> None:
    data = load_vqa(_vqa_file(tmp_path))
    assert [item.id for item in data] == ["a", "b"]
    reasons = {f.id: f.reason for f in data.failures}
    assert sorted(reasons) == ["c", "d", "e"]
    assert "truncated" in reasons["c"].lower()
    assert "cannot identify" in reasons["d"].lower()
    assert "no such file" in reasons["e"]
    assert all(f.index == i for f, i in zip(data.failures, [2, 3, 4]))
    item = data[1]
    assert item.choices == ("circle", "square") and item.image.size == (64, 20)
    assert item.grade("The answer is B.").correct and not item.grade("A").correct
    assert data.n_total == 5 and load_dataset(tmp_path / "vqa.jsonl").fingerprint == data.fingerprint
    _write_image(tmp_path / "images" / "ok.png", color=(11, 200, 30))  # same file name, other pixels
    assert load_vqa(tmp_path / "vqa.jsonl").fingerprint != data.fingerprint


def test_validate_image_reports_truncation(tmp_path) -> None:
    good = _write_image(tmp_path / "x.jpg", size=(64, 64))
    data = good.read_bytes()
    with pytest.raises(ImageLoadError):
        validate_image(data[: len(data) // 3])
    assert validate_image(data).size == (64, 64)
    assert validate_image({"bytes": data, "path": None}).size == (64, 64)
    assert validate_image(good).open().mode == "RGB"


def test_conditions_build_blank_and_description_prompts(tmp_path) -> None:
    data = load_vqa(_vqa_file(tmp_path))
    fmt = PromptFormat(instruction="Answer briefly.", blank_color=(0, 0, 0))
    image, blank, described, text = (build_requests(data, c, fmt) for c in ("image", "blank", "description", "text"))
    assert image[1].prompt == "Which shape?\nA. circle\nB. square\nAnswer briefly."
    real = image[1].images[0].open()
    blank_img = blank[1].images[0].open()
    assert blank_img.size == real.size == (64, 20) and blank_img.getextrema() == ((0, 0),) * 3
    assert described[0].prompt.startswith("Image description: three dots\nHow many?")
    assert text[0].images == () and text[0].prompt == "How many?\nAnswer briefly."
    with pytest.raises(DatasetError, match="does not apply"):
        build_requests(data, "target")


def test_description_condition_needs_descriptions(tmp_path) -> None:
    path = tmp_path / "v.jsonl"
    _write_image(tmp_path / "i.png")
    path.write_text(json.dumps({"id": 1, "question": "q", "image": "i.png", "answer": "1"}) + "\n")
    with pytest.raises(DatasetError, match="description"):
        build_requests(load_vqa(path), "description")


def test_dataset_like_iterables_with_pil_images() -> None:
    class FakeHFDataset:  # what `datasets.Dataset` yields: dicts with decoded PIL images
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    rows = [{"query": f"q{i}", "decoded_image": Image.new("RGB", (8, 8), (i, 0, 0)), "answer": str(i)}
            for i in range(3)]
    data = load_vqa(FakeHFDataset(rows), columns={"question": "query", "image": "decoded_image"})
    assert [item.id for item in data] == ["0", "1", "2"] and data[2].image.open().getpixel((0, 0)) == (2, 0, 0)
    again = load_vqa(FakeHFDataset(rows), columns={"question": "query", "image": "decoded_image"})
    rows[1]["decoded_image"] = Image.new("RGB", (8, 8), (9, 9, 9))
    changed = load_vqa(FakeHFDataset(rows), columns={"question": "query", "image": "decoded_image"})
    assert data.fingerprint == again.fingerprint != changed.fingerprint


def test_text_items_and_layout_detection(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "question": f"{i} plus 1 ?", "answer": str(i + 1),
                                          "category": "add"}) for i in range(4)) + "\n")
    data = load_dataset(path)
    assert data.kind == "text" and len(data) == 4 and data[3].answer == "4" and data[0].id == "0"
    assert [r.prompt for r in build_requests(data, "text")][:1] == ["0 plus 1 ?"]
    assert len(load_text(path, limit=2)) == 2


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"id": 1, "question": "q", "answer": "1"}\n{"id": 2, "question": \n', "line 2: not valid JSON"),
        ('{"id": 1, "question": "q", "answer": "1"}\n{"id": 1, "question": "r", "answer": "2"}\n', "duplicate ids"),
        ('{"id": 1, "prompt": "q"}\n', "Cannot tell the dataset layout"),
        ('[1, 2]\n', "expected a JSON object"),
    ],
)
def test_bad_files_raise_actionable_errors(tmp_path, content, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_missing_fields_are_named(tmp_path) -> None:
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "q", "image": "x.png"}) + "\n")
    with pytest.raises(DatasetError, match=r"missing field\(s\) \['answer'\]"):
        load_vqa(path)


def _swap_root(tmp_path: Path, tasks=("alpha", "beta"), n: int = 3, broken: str | None = None) -> Path:
    """A swap-pair root with ``n`` pairs per task; ``broken`` names a pair whose target image is not an image."""
    root = tmp_path / "pairs"
    for task in tasks:
        folder = root / task
        (folder / "images").mkdir(parents=True)
        lines = []
        for i in range(n):
            pid = f"{task}_{i}"
            _write_image(folder / "images" / f"{pid}_t.png", color=(i, 0, 0))
            _write_image(folder / "images" / f"{pid}_s.png", color=(0, i, 0))
            if pid == broken:
                (folder / "images" / f"{pid}_t.png").write_text("not an image")
            lines.append({"id": pid, "task": task, "target_image": f"images/{pid}_t.png",
                          "source_image": f"images/{pid}_s.png", "prompt": "<image>How many?",
                          "meta": {"target_answer": str(i), "source_answer": str(i + 10)}})
        (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return root


def test_limit_counts_items_not_items_per_task(tmp_path) -> None:
    root = _swap_root(tmp_path)
    assert [p.id for p in load_swap_pairs(root, limit=4)] == ["alpha_0", "alpha_1", "alpha_2", "beta_0"]
    assert [p.id for p in load_dataset(root, limit=4)] == ["alpha_0", "alpha_1", "alpha_2", "beta_0"]
    assert [p.id for p in load_swap_pairs(root, per_task=1)] == ["alpha_0", "beta_0"]
    assert [p.id for p in load_swap_pairs(root, tasks=["beta"], limit=2)] == ["beta_0", "beta_1"]
    assert len(load_swap_pairs(root)) == 6
    with pytest.raises(DatasetError, match="no pairs of the tasks \\['gamma'\\].*tasks present: \\['alpha', 'beta'\\]"):
        load_swap_pairs(root, tasks=["gamma"])
    with pytest.raises(DatasetError, match="limit must be a positive number"):
        load_swap_pairs(root, limit=0)


def test_failure_reasons_hold_no_memory_address(tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "bad.png").write_text("this is not a png")
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "q", "image": "images/bad.png", "answer": "1"}) + "\n")
    reasons = [load_vqa(path).failures[0].reason for _ in range(2)]
    assert reasons[0] == reasons[1] and "0x" not in reasons[0], reasons
    assert reasons[0] == f"image: {images / 'bad.png'}: UnidentifiedImageError: cannot identify image file (image data)"
    with pytest.raises(ImageLoadError) as caught:
        validate_image(b"not an image")
    assert "0x" not in str(caught.value) and "cannot identify image file" in str(caught.value)


def test_swap_pair_failures_keep_both_answers(tmp_path) -> None:
    pairs = load_swap_pairs(_swap_root(tmp_path, tasks=("alpha",), broken="alpha_1"))
    assert [p.id for p in pairs] == ["alpha_0", "alpha_2"]
    failure = pairs.failures[0]
    assert failure.id == "alpha_1" and failure.reason.startswith("target_image: ")
    assert (failure.answer("target"), failure.answer("source")) == ("1", "11")


@pytest.mark.parametrize(
    "content,loaders",
    [("", ("load_vqa", "load_text", "load_swap_pairs", "load_dataset")),
     ("\n\n", ("load_vqa", "load_text", "load_dataset"))],
)
def test_empty_files_raise_in_every_loader(tmp_path, content, loaders) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    functions = {"load_vqa": load_vqa, "load_text": load_text, "load_swap_pairs": load_swap_pairs,
                 "load_dataset": load_dataset}
    for name in loaders:
        with pytest.raises(DatasetError, match="holds no items"):
            functions[name](path)
    with pytest.raises(DatasetError, match="source holds no items"):
        load_vqa(iter([]))


def test_loaders_refuse_another_layout(tmp_path) -> None:
    vqa = _vqa_file(tmp_path)
    with pytest.raises(DatasetError, match="these are VQA items.*use load_vqa.*'text' condition"):
        load_text(vqa)
    with pytest.raises(DatasetError, match="these are VQA items.*use load_vqa"):
        load_swap_pairs(vqa)
    pairs = _swap_root(tmp_path, tasks=("alpha",)) / "alpha" / "data.jsonl"
    with pytest.raises(DatasetError, match="these are swap pairs.*use load_swap_pairs"):
        load_vqa(pairs)
    with pytest.raises(DatasetError, match="these are swap pairs"):
        load_text(pairs)
    text = tmp_path / "t.jsonl"
    text.write_text(json.dumps({"id": 1, "question": "q", "answer": "1", "image": None}) + "\n")
    assert len(load_text(text)) == 1  # an empty image field is no image
