"""Testbed data: reproducible, answers right by an independent recount from the drawn pixels.

The oracle here never calls the generator's labels: it reads each written PNG back, finds the
shapes from pixels (a colour classifier by channel ratios and a shape classifier by how much
of its bounding box a blob fills), re-derives every answer from the question text with its
own parser, and checks the descriptions the same way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_probe.testbed import scenes, tasks
from vlm_probe.testbed.datasets import write_datasets

CELL = 14
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle"}


# ----------------------------------------------------------------------------- the independent oracle


def colour_name(rgb: np.ndarray) -> str:
    r, g, b = (int(v) for v in rgb)
    if r > 150 and g > 150 and b < 100:
        return "yellow"
    if r > 150 and g < 100 and b < 100:
        return "red"
    if g > 150 and r < 100 and b < 100:
        return "green"
    if b > 150 and r < 100 and g < 150:
        return "blue"
    raise AssertionError(f"pixel {rgb} has no palette colour")


def detect(path: Path) -> dict[tuple[int, int], tuple[str, str]]:
    """(row, column) -> (colour, shape), read from the pixels of a rendered scene."""
    pixels = np.asarray(Image.open(path).convert("RGB"))
    grid = pixels.shape[0] // CELL
    assert pixels.shape == (grid * CELL, grid * CELL, 3)
    found = {}
    for row in range(grid):
        for col in range(grid):
            block = pixels[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL]
            on = block.sum(axis=2) > 0
            if not on.any():
                continue
            colours = {tuple(p) for p in block[on]}
            assert len(colours) == 1, f"cell {(row, col)} of {path.name} mixes colours"
            ys, xs = np.nonzero(on)
            fill = on.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
            shape = "square" if fill > 0.95 else "circle" if fill > 0.7 else "triangle"
            found[(row + 1, col + 1)] = (colour_name(block[on][0]), shape)
    return found


def count(found: dict, colour: str | None = None, shape: str | None = None) -> int:
    return sum(1 for c, s in found.values() if colour in (None, c) and shape in (None, s))


def answer_from_pixels(question: str, found: dict) -> str:
    """Answer a question by parsing it and counting over detected shapes."""
    q = question
    if m := re.fullmatch(r"how many shapes are there(?: plus (\d+))? \?", q):
        return str(len(found) + int(m.group(1) or 0))
    if m := re.fullmatch(r"how many (\w+) shapes are there(?: plus (\d+))? \?", q):
        return str(count(found, colour=m.group(1)) + int(m.group(2) or 0))
    if m := re.fullmatch(r"how many (circles|squares|triangles) are there \?", q):
        return str(count(found, shape=PLURALS[m.group(1)]))
    if m := re.fullmatch(r"how many shapes are not (\w+) \?", q):
        return str(len(found) - count(found, colour=m.group(1)))
    if m := re.fullmatch(r"what color is the shape in row (\d) column (\d) \?", q):
        return found[(int(m.group(1)), int(m.group(2)))][0]
    if m := re.fullmatch(r"what shape is in row (\d) column (\d) \?", q):
        return found[(int(m.group(1)), int(m.group(2)))][1]
    if m := re.fullmatch(r"which (row|column) is the (\w+) (\w+) in \?", q):
        cells = [cell for cell, kind in found.items() if kind == (m.group(2), m.group(3))]
        assert len(cells) == 1, f"{q!r} is ambiguous: {cells}"
        return str(cells[0][0] if m.group(1) == "row" else cells[0][1])
    if m := re.fullmatch(r"are there more (\w+) shapes than (\w+) shapes \?", q):
        return "yes" if count(found, colour=m.group(1)) > count(found, colour=m.group(2)) else "no"
    if m := re.fullmatch(r"are there more (\w+) than (\w+) \?", q):
        return "yes" if count(found, shape=PLURALS[m.group(1)]) > count(found, shape=PLURALS[m.group(2)]) else "no"
    raise AssertionError(f"unparsed question {q!r}")


def answer_text(question: str) -> str:
    if m := re.fullmatch(r"what is ([\d ]+(?:(?:plus|minus) \d+ ?)+)\?", question):
        expression = m.group(1).replace("plus", "+").replace("minus", "-")
        return str(eval(expression))  # noqa: S307 - digits and +/- only, matched above
    if m := re.fullmatch(r"is (\d+) more than (\d+) \?", question):
        return "yes" if int(m.group(1)) > int(m.group(2)) else "no"
    raise AssertionError(f"unparsed question {question!r}")


def parse_description(text: str) -> dict[tuple[int, int], tuple[str, str]]:
    assert text.startswith("the image has ") and text.endswith(" .")
    body = text[len("the image has ") : -2]
    found = {}
    for part in body.split(" , "):
        m = re.fullmatch(r"a (\w+) (\w+) in row (\d) column (\d)", part)
        assert m, part
        found[(int(m.group(3)), int(m.group(4)))] = (m.group(1), m.group(2))
    return found


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_datasets(
        tmp_path_factory.mktemp("data") / "set", seed=5, counts={"perception": 70, "v2r": 50, "text": 40},
        swap_per_task=12,
    )


def test_vqa_answers_match_an_independent_recount(dataset) -> None:
    for name in ("perception", "v2r"):
        rows = read_jsonl(dataset / f"{name}.jsonl")
        assert len(rows) == {"perception": 70, "v2r": 50}[name]
        assert {r["task"] for r in rows} == set(tasks.TASKS[name])  # every task represented
        for row in rows:
            assert set(row) == {"id", "question", "image", "answer", "category", "description", "task"}
            assert row["category"] == name
            found = detect(dataset / row["image"])
            assert answer_from_pixels(row["question"], found) == row["answer"], row
            assert parse_description(row["description"]) == found, row["id"]


def test_text_answers_and_format(dataset) -> None:
    rows = read_jsonl(dataset / "text.jsonl")
    assert len(rows) == 40
    for row in rows:
        assert set(row) == {"id", "question", "answer", "category"}
        assert answer_text(row["question"]) == row["answer"], row


def test_swap_pairs_differ_and_are_right(dataset) -> None:
    rows = read_jsonl(dataset / "swap.jsonl")
    assert len(rows) == 12 * len(tasks.SWAP_TASKS)
    for row in rows:
        assert set(row) == {"id", "task", "target_image", "source_image", "prompt", "meta"}
        target, source = detect(dataset / row["target_image"]), detect(dataset / row["source_image"])
        meta = row["meta"]
        assert answer_from_pixels(row["prompt"], target) == meta["target_answer"], row
        assert answer_from_pixels(row["prompt"], source) == meta["source_answer"], row
        assert meta["target_answer"] != meta["source_answer"]
        assert Image.open(dataset / row["target_image"]).size == Image.open(dataset / row["source_image"]).size
        assert parse_description(meta["source_description"]) == source
        # minimal edits: the scenes differ in at most two cells
        changed = {c for c in set(target) | set(source) if target.get(c) != source.get(c)}
        assert 1 <= len(changed) <= 2, row["id"]


def test_datasets_are_reproducible(dataset, tmp_path) -> None:
    again = write_datasets(tmp_path / "again", seed=5, counts={"perception": 70, "v2r": 50, "text": 40},
                           swap_per_task=12)
    for name in ("perception.jsonl", "v2r.jsonl", "text.jsonl", "swap.jsonl"):
        assert (again / name).read_bytes() == (dataset / name).read_bytes()
    assert (again / "images" / "swap-counting-00003-source.png").read_bytes() == (
        dataset / "images" / "swap-counting-00003-source.png"
    ).read_bytes()
    other = write_datasets(tmp_path / "other", seed=6, counts={"perception": 70}, swap_per_task=1)
    assert (other / "perception.jsonl").read_text() != (dataset / "perception.jsonl").read_text()


def test_write_refuses_an_existing_folder(dataset) -> None:
    from vlm_probe.errors import VLMProbeError

    with pytest.raises(VLMProbeError, match="already exists"):
        write_datasets(dataset, seed=5)


def test_training_stream_is_seeded_and_excludes_held_out_items() -> None:
    mixture = tuple((family, 1.0) for family in tasks.FAMILIES)
    first = [i.key + i.answer for i in tasks.ItemStream(3, mixture).take(200)]
    assert first == [i.key + i.answer for i in tasks.ItemStream(3, mixture).take(200)]
    assert first != [i.key + i.answer for i in tasks.ItemStream(4, mixture).take(200)]
    held = tasks.held_out_items(9, {"perception": 30, "v2r": 30})
    scene_keys = {i.key for i in held}
    stream = tasks.ItemStream(3, mixture, exclude=frozenset(scene_keys))
    assert not scene_keys & {i.key for i in stream.take(500)}


def test_described_items_carry_the_scene_in_text_and_a_blank_image() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        item = tasks.make_item(rng, "described", blank_colors=tasks.BLANK_COLORS)
        description, question = item.question.split(" . ", 1)
        found = parse_description(description + " .")
        assert answer_from_pixels(question, found) == item.answer
        pixels = np.asarray(item.picture())
        assert (pixels == pixels[0, 0]).all()  # uniform


def test_every_prompt_tokenizes_without_unknown_words(zoo) -> None:
    tok = zoo("qwen2_5_vl").tokenizer
    rng = np.random.default_rng(1)
    texts = set()
    for family in tasks.FAMILIES:
        for _ in range(100):
            item = tasks.make_item(rng, family)
            texts |= {item.question, item.answer}
    for task in tasks.SWAP_TASKS:
        pair = tasks.swap_pair(rng, task)
        texts |= {pair.prompt, pair.target.describe(), pair.target_answer, pair.source_answer}
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
    for answer in {t for t in texts if " " not in t}:
        assert len(tok(answer, add_special_tokens=False)["input_ids"]) == 1, answer


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_longest_response_fits_the_recorded_generation_budget(zoo, dataset, family) -> None:
    from vlm_probe.testbed.traces import MAX_NEW_TOKENS

    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["generation"] == {"max_new_tokens": MAX_NEW_TOKENS}
    tok = zoo(family).tokenizer
    rng = np.random.default_rng(4)
    longest = max(len(tok(tasks.make_item(rng, f).response, add_special_tokens=False)["input_ids"])
                  for f in tasks.FAMILIES for _ in range(300))
    assert longest + 1 <= MAX_NEW_TOKENS  # the response and its stop token


def test_scene_rules_and_rendering() -> None:
    with pytest.raises(ValueError, match="share a cell"):
        scenes.Scene((scenes.Shape(1, 1, "red", "circle"), scenes.Shape(1, 1, "blue", "square")))
    with pytest.raises(ValueError, match="outside"):
        scenes.Scene((scenes.Shape(5, 1, "red", "circle"),))
    scene = scenes.Scene((scenes.Shape(2, 3, "blue", "triangle"),))
    pixels = scenes.render_array(scene)
    assert pixels.shape == (42, 42, 3)
    assert (pixels[:14].sum() == 0) and pixels[14:28, 28:42].any()
    assert scenes.render_array(scenes.Scene(scene.shapes, grid=4)).shape == (56, 56, 3)
    with pytest.raises(ValueError, match="Unknown task family"):
        tasks.make_item(np.random.default_rng(0), "vision")
    with pytest.raises(ValueError, match="Unknown mixture entry"):
        tasks.parse_mixture((("perception/colour", 1.0),))


def test_larger_grids_render_and_answer_right(tmp_path) -> None:
    folder = write_datasets(tmp_path / "grid4", seed=2, counts={"perception": 21, "v2r": 10},
                            swap_per_task=3, scenes=tasks.SceneOptions(grid=4, max_shapes=10))
    for row in read_jsonl(folder / "perception.jsonl") + read_jsonl(folder / "v2r.jsonl"):
        found = detect(folder / row["image"])
        assert answer_from_pixels(row["question"], found) == row["answer"], row
    assert Image.open(folder / "images" / "blank.png").size == (56, 56)


# ----------------------------------------------------------------------------- responses and demonstrations

SINGULARS = {"shape": "shapes", "circle": "circles", "square": "squares", "triangle": "triangles"}


def check_trace(question: str, response: str, found: dict | None) -> list[str]:
    """Every claim of a trace checked against the scene (``found``, recounted from pixels) or the
    question's numbers; returns the claims that are wrong (empty for a correct trace)."""
    wrong = []
    *steps, final = response.split(" . ")
    assert final.startswith("the answer is "), response
    answer = final[len("the answer is "):]
    results = []
    for step in steps:
        if m := re.fullmatch(r"(\d+) (plus|minus) (\d+) = (\d+)", step):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            if (a + b if op == "plus" else a - b) != c:
                wrong.append(step)
            results.append(str(c))
        elif m := re.fullmatch(r"(\d+) is (not )?more than (\d+)", step):
            more = int(m.group(1)) > int(m.group(3))
            if more == bool(m.group(2)):
                wrong.append(step)
            results.append("no" if m.group(2) else "yes")
        elif m := re.fullmatch(r"row (\d) column (\d) : (\w+) (\w+)", step):
            if found.get((int(m.group(1)), int(m.group(2)))) != (m.group(3), m.group(4)):
                wrong.append(step)
        elif m := re.fullmatch(r"(\w+) (\w+) : row (\d) column (\d)", step):
            cells = [cell for cell, kind in found.items() if kind == (m.group(1), m.group(2))]
            if cells != [(int(m.group(3)), int(m.group(4)))]:
                wrong.append(step)
        else:  # counts read: "2 red shapes , 1 circle"
            for read in step.split(" , "):
                m = re.fullmatch(r"(\d+) (?:(\w+) )?(shapes?|circles?|squares?|triangles?)", read)
                assert m, (step, response)
                noun = m.group(3).rstrip("s")
                colour = m.group(2)
                assert (int(m.group(1)) == 1) == (m.group(3) == noun), read  # singular exactly for 1
                kind = None if noun == "shape" else noun
                if count(found, colour=colour, shape=kind) != int(m.group(1)):
                    wrong.append(read)
    if results and results[-1] != answer:
        wrong.append(f"answer {answer} does not follow from {results[-1]}")
    return wrong


def truth(item: tasks.Item) -> tuple[str, dict | None]:
    """The item's answer derived independently (pixels or description, the question's numbers)."""
    if item.family == "text":
        return answer_text(item.question), None
    if item.family == "described":
        description, question = item.question.split(" . ", 1)
        found = parse_description(description + " .")
        return answer_from_pixels(question, found), found
    found = detect_array(np.asarray(item.picture()))
    return answer_from_pixels(item.question, found), found


def detect_array(pixels: np.ndarray) -> dict:
    path = Path(_tmp_png.name)
    Image.fromarray(pixels).save(path)
    return detect(path)


import tempfile  # noqa: E402

_tmp_png = tempfile.NamedTemporaryFile(suffix=".png", delete=False)


def test_responses_are_right_by_an_independent_recount() -> None:
    rng = np.random.default_rng(21)
    seen = set()
    for family in tasks.FAMILIES:
        for task in tasks.TASKS[family]:
            for _ in range(25):
                item = tasks.make_item(rng, family, task, blank_colors=tasks.BLANK_COLORS)
                answer, found = truth(item)
                assert item.answer == answer, item
                response = item.response
                assert response.endswith(f"the answer is {answer}"), response
                assert check_trace(item.question, response, found) == [], (item.question, response)
                seen.add((family, task, response.count(" . ")))
    # a trace before every reasoning answer: counts read, then a step (text: the steps alone)
    traced = {(f, t) for f, t, dots in seen if dots >= (1 if f == "text" else 2)}
    assert {(f, t) for f in ("v2r", "described", "text") for t in tasks.TASKS[f]} <= traced


def test_demonstrations_hold_the_stated_share_of_one_step_mistakes() -> None:
    from vlm_probe.testbed.curriculum import demonstration_set

    mixture = (("v2r", 1.0), ("described", 0.5), ("text", 0.5), ("perception", 0.5))
    demos = demonstration_set(7, mixture, 1200, error_rate=0.25, scenes=tasks.SceneOptions(max_shapes=4),
                              exclude=frozenset())
    traced = [(ex, m) for ex, m in zip(demos.examples, demos.mistakes) if ex[0].working is not None]
    share = np.mean([m is not None for _, m in traced])
    assert abs(share - 0.25) < 3 * np.sqrt(0.25 * 0.75 / len(traced))  # binomial, 3 sigma
    kinds = set()
    for (item, text), mistake in traced:
        answer, found = truth(item)
        wrong = check_trace(item.question, text, found)
        if mistake is None:
            assert text == item.response and wrong == [], text
        else:  # exactly one false claim, the rest follows from it, and the outcome is wrong
            kinds.add(mistake)
            assert len(wrong) == 1 and not text.endswith(f"the answer is {answer}"), (item.question, text, wrong)
    assert kinds == {"read", "step"}
    assert all(text == item.response for (item, text), m in zip(demos.examples, demos.mistakes)
               if item.working is None)  # perception answers are given as they are
    again = demonstration_set(7, mixture, 1200, error_rate=0.25, scenes=tasks.SceneOptions(max_shapes=4),
                              exclude=frozenset())
    assert again == demos  # seeded
