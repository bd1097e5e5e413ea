"""Evaluation runs: greedy generation, batching, resumability (a real kill), settings, CLI."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import vlm_probe
from vlm_probe.errors import VLMProbeError
from vlm_probe.evaluation import (
    EvalRun,
    Generation,
    GreedyGenerator,
    build_requests,
    evaluate,
    evaluate_fine_grained,
    greedy_config,
    load_vqa,
    run_requests,
)
from vlm_probe.commands.eval import register
from vlm_probe.results import Result
from vlm_probe.testbed.zoo import tiny_vlm

QUESTIONS = ["how many red circles are there ?", "what color is the square ?", "count the shapes .",
             "is there a blue triangle in the top left cell ?"]


def _dataset(tmp_path: Path, tv, n: int = 8, broken: bool = True) -> Path:
    """A VQA jsonl of ``n`` items with zoo images of varied sizes, plus one truncated image."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    records = []
    for i in range(n):
        size = [(32, 32), (32, 48), (64, 32), (48, 48)][i % 4]
        tv.image(i, size).save(folder / "img" / f"{i}.png")
        records.append({"id": f"item{i}", "question": f"item{i} : {QUESTIONS[i % 4]}", "image": f"img/{i}.png",
                        "answer": str(i % 5), "category": ["count", "color"][i % 2], "description": "some shapes"})
    if broken:
        data = (folder / "img" / "0.png").read_bytes()
        (folder / "img" / "broken.png").write_bytes(data[: len(data) // 2])
        records.insert(3, {"id": "broken", "question": "count", "image": "img/broken.png", "answer": "1"})
    path = folder / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    return tiny_vlm("qwen2_5_vl").save(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def disk_vlm(saved_model):
    return vlm_probe.load(saved_model)


def _manual_greedy(vlm, batch, steps: int, banned: list[int]) -> list[int]:
    """Greedy decoding by hand: full forward passes without cache, argmax over allowed tokens."""
    inputs = {k: v.clone() for k, v in batch.inputs.items()}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = vlm.hf(**inputs).logits[0, -1]
            logits[banned] = -float("inf")
            token = int(logits.argmax())
            out.append(token)
            if token == vlm.tokenizer.eos_token_id:
                break
            inputs["input_ids"] = torch.cat([inputs["input_ids"], torch.tensor([[token]])], dim=1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
            if "mm_token_type_ids" in inputs:
                inputs["mm_token_type_ids"] = torch.cat(
                    [inputs["mm_token_type_ids"], torch.zeros(1, 1, dtype=inputs["mm_token_type_ids"].dtype)], 1)
    return out


def test_greedy_config_overrides_sampling_defaults_of_the_checkpoint() -> None:
    tv = tiny_vlm("qwen2_5_vl", seed=3)
    # transformers fills every field a passed config leaves unset from the checkpoint's own config
    tv.model.generation_config.update(do_sample=True, temperature=0.7, top_k=5, repetition_penalty=1.5,
                                      no_repeat_ngram_size=1, num_return_sequences=2)
    vlm = vlm_probe.load(tv)
    config = greedy_config(vlm, max_new_tokens=6)
    assert (config.do_sample, config.num_beams, config.repetition_penalty, config.max_new_tokens) == (False, 1, 1.0, 6)
    assert config.suppress_tokens == [vlm.image_token_id, vlm.hf.config.video_token_id]
    assert config.pad_token_id == vlm.tokenizer.pad_token_id and vlm.tokenizer.eos_token_id in config.eos_token_id
    batch = vlm.prepare(QUESTIONS[0], images=[tv.image(1)])
    generated = GreedyGenerator(vlm, 6)(batch)[0]
    expected = _manual_greedy(vlm, batch, 6, config.suppress_tokens)
    assert generated.n_tokens == len(expected)
    assert generated.text == vlm.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert vlm.hf.generation_config.num_return_sequences == 2, "the checkpoint's config was not restored"


def test_the_image_token_is_never_generated() -> None:
    tv = tiny_vlm("qwen2_5_vl", seed=4)
    vlm = vlm_probe.load(tv)
    batch = vlm.prepare(QUESTIONS[1], images=[tv.image(2)])
    with torch.no_grad():  # steer the head so that the image token wins the first step by far
        hidden = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states[-1][0, -1]
        vlm.hf.lm_head.weight[vlm.image_token_id] = 100 * hidden / hidden.norm() ** 2
    plain = vlm.hf.generate(**batch.inputs, generation_config=greedy_config(vlm, 1, suppress_tokens=None))
    assert int(plain[0, -1]) == vlm.image_token_id, "the steering did not work; the test would prove nothing"
    out = vlm.hf.generate(**batch.inputs, generation_config=greedy_config(vlm, 4))
    assert vlm.image_token_id not in out[0, batch.width:].tolist()
    assert GreedyGenerator(vlm, 4)(batch)[0].n_tokens == 4  # and generation runs on without failing


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_left_padded_batches_generate_what_single_items_do(zoo, family) -> None:
    tv = zoo(family)
    vlm = vlm_probe.load(tv)
    generator = GreedyGenerator(vlm, 8)
    images = [[tv.image(0)], None, [tv.image(2)], None]
    prompts = [QUESTIONS[0], "count", QUESTIONS[3], QUESTIONS[1]]
    together = generator(vlm.prepare(prompts, images=images))
    alone = [generator(vlm.prepare([p], images=[i]))[0] for p, i in zip(prompts, images)]
    assert together == alone


def test_callable_generators_are_graded_like_models(tmp_path, qwen, zoo) -> None:
    data = load_vqa(_dataset(tmp_path, zoo("qwen2_5_vl"), n=6, broken=False))
    answers = {item.id: item.answer for item in data}
    seen = []

    def fake(batch):  # right on real images, "0" on blank ones, in varied answer formats
        seen.append(len(batch))
        outs = []
        for row in batch.rows:
            blank = row.images[0].getextrema() == ((255, 255),) * 3
            item = re.search(r"(item\d+) :", row.text).group(1)
            outs.append("<answer>0</answer>" if blank else f"The answer is {answers[item]}.")
        return outs

    requests = build_requests(data, "image")
    rows, stats = run_requests(qwen, requests, generate=fake, batch_size=4, quiet=True)
    assert seen == [4, 2] and stats.generated == 6 and [r["id"] for r in rows] == [r.id for r in requests]
    assert all(r["correct"] for r in rows)
    result = evaluate_fine_grained(qwen, general=data, generate=fake, batch_size=4, quiet=True, name="fake",
                                   n_resamples=200)
    frame = result.to_frame().set_index("metric")
    # gold answers are 0..4: the blank-image answer "0" is right exactly for item0 and item5
    assert frame.loc["M_vis", "value"] == pytest.approx(4 / 6)
    assert result.transitions("M_vis").as_dict() == {"both": 2, "a_only": 4, "b_only": 0, "neither": 0}
    with pytest.raises(VLMProbeError, match="one text"):
        run_requests(qwen, requests, generate=lambda batch: ["x"], batch_size=2, quiet=True)


def test_runs_record_settings_and_failures(tmp_path, disk_vlm, saved_model, zoo) -> None:
    path = _dataset(tmp_path, zoo("qwen2_5_vl"), n=4)
    run = evaluate(disk_vlm, path, conditions=["image", "text"], out=tmp_path / "run", batch_size=3,
                   max_new_tokens=5, seed=7, quiet=True)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    identity = saved["identity"]
    generation = identity["generation"]["generation_config"]
    assert generation["do_sample"] is False and generation["num_beams"] == 1
    assert generation["max_new_tokens"] == 5 and disk_vlm.image_token_id in generation["suppress_tokens"]
    assert identity["seed"] == 7 and identity["model"]["path"] == str(saved_model)
    assert identity["model"]["dtype"] == "torch.float32" and identity["model"]["attn_implementation"] == "sdpa"
    assert saved["environment"]["batch_size"] == 3
    failures = run.failures()
    assert failures["id"].tolist() == ["broken", "broken"] and "Truncated" in failures["error"].iloc[0]
    assert run.accuracy()["n"].tolist() == [4, 4] and run.accuracy()["failed"].tolist() == [1, 1]
    text_prompts = run.frame[run.frame["condition"] == "text"]["prompt"].dropna()
    assert len(text_prompts) == 5
    back = Result.load(tmp_path / "run" / "result")
    assert isinstance(back, EvalRun)
    pd.testing.assert_frame_equal(back.to_frame(), run.to_frame())
    with pytest.raises(VLMProbeError, match="max_new_tokens: 5 \\(saved\\) vs 6 \\(now\\)"):
        evaluate(disk_vlm, path, conditions=["image"], out=tmp_path / "run", max_new_tokens=6, quiet=True)
    again = evaluate(disk_vlm, path, conditions=["image"], out=tmp_path / "run", max_new_tokens=6, quiet=True,
                     overwrite=True)
    assert again.meta["stats"]["image"]["resumed"] == 0


KILLED_RUN = '''
import sys, time
import torch
torch.set_num_threads(1)
import vlm_probe
from vlm_probe.evaluation import GreedyGenerator, evaluate

model, data, out = sys.argv[1:4]
vlm = vlm_probe.load(model)
inner = GreedyGenerator(vlm, max_new_tokens=6)


class Slow:  # the same generator, slowed so that the parent can kill it mid-run
    settings = property(lambda self: inner.settings)

    def __call__(self, batch):
        time.sleep(0.4)
        return inner(batch)


evaluate(vlm, data, conditions=["image", "blank"], out=out, generate=Slow(), batch_size=2, quiet=True)
print("finished")
'''


def _lines(path: Path) -> list[str]:
    """The complete lines of a file (a line torn by the kill is left out)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [line for line in lines if line.endswith("\n")]


def test_a_killed_run_resumes_to_the_identical_table(tmp_path, saved_model, disk_vlm, zoo) -> None:
    data = _dataset(tmp_path, zoo("qwen2_5_vl"), n=8)
    script = tmp_path / "run_eval.py"
    script.write_text(KILLED_RUN)
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(script), str(saved_model), str(data), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "rows" / "image.jsonl"
    deadline = time.monotonic() + 180
    try:
        while len(_lines(log)) < 5:  # the failure row, then two batches of two items
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the evaluation subprocess made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _lines(log)
    assert 5 <= len(before) < 9, "the kill should land before the image condition finished"
    assert not (out / "rows" / "blank.jsonl").exists()

    calls = []
    inner = GreedyGenerator(disk_vlm, max_new_tokens=6)

    class Counting:
        settings = property(lambda self: inner.settings)

        def __call__(self, batch):
            calls.append(len(batch))
            return inner(batch)

    resumed = evaluate(disk_vlm, data, conditions=["image", "blank"], out=out, generate=Counting(), batch_size=2,
                       quiet=True)
    stats = resumed.meta["stats"]
    done_before = len(before) - 1  # minus the failure row
    assert stats["image"]["resumed"] == done_before and stats["image"]["generated"] == 8 - done_before
    assert stats["blank"]["resumed"] == 0 and stats["blank"]["generated"] == 8
    # batches are fixed slices of two; a kill between the two rows of a batch redoes that batch only
    assert sum(calls) == 16 - done_before + done_before % 2, "finished items were generated again"
    assert _lines(log)[: len(before)] == before, "rows written before the kill were rewritten"

    full = evaluate(disk_vlm, data, conditions=["image", "blank"], out=tmp_path / "full", batch_size=2,
                    max_new_tokens=6, quiet=True)
    pd.testing.assert_frame_equal(resumed.to_frame(), full.to_frame())
    assert len(full.frame) == 18 and full.frame["response"].notna().sum() == 16


def test_eval_command(tmp_path, saved_model, zoo, capsys) -> None:
    data = _dataset(tmp_path, zoo("qwen2_5_vl"), n=3)
    parser = argparse.ArgumentParser(prog="vlm-probe")
    assert "example:" in register(parser.add_subparsers(dest="command")).format_help()
    args = parser.parse_args(["eval", str(saved_model), "--data", str(data), "--out", str(tmp_path / "cli"),
                              "--batch-size", "2", "--max-new-tokens", "3", "--by", "category", "-q"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "count" in printed and "broken" in printed
    assert len(_lines(tmp_path / "cli" / "rows" / "image.jsonl")) == 4
    assert isinstance(Result.load(tmp_path / "cli" / "result"), EvalRun)


def test_generation_outputs_accept_plain_texts(qwen) -> None:
    from vlm_probe.evaluation.runner import _as_generations

    assert _as_generations(["a", Generation("b", 2, True)], 2) == [Generation("a"), Generation("b", 2, True)]


def test_a_batch_cut_between_its_rows_is_redone_whole(tmp_path, disk_vlm, zoo) -> None:
    data = _dataset(tmp_path, zoo("qwen2_5_vl"), n=6)
    full = evaluate(disk_vlm, data, out=tmp_path / "run", batch_size=2, max_new_tokens=4, quiet=True)
    log = tmp_path / "run" / "rows" / "image.jsonl"
    lines = _lines(log)  # the failure row, then item0 .. item5 in batches [0, 1] [2, 3] [4, 5]
    assert [json.loads(line)["id"] for line in lines] == ["broken"] + [f"item{i}" for i in range(6)]
    log.write_text("".join(lines[:4]) + lines[4][:25])  # killed after item2 and while writing item3
    calls = []
    inner = GreedyGenerator(disk_vlm, max_new_tokens=4)

    def counting(batch):
        calls.append([row.text.split(" : ")[0][-5:] for row in batch.rows])
        return inner(batch)

    counting.settings = inner.settings
    resumed = evaluate(disk_vlm, data, out=tmp_path / "run", generate=counting, batch_size=2, quiet=True)
    assert calls == [["item2", "item3"], ["item4", "item5"]]
    assert resumed.meta["stats"]["image"]["resumed"] == 3 and resumed.meta["stats"]["image"]["generated"] == 3
    assert _lines(log)[:4] == lines[:4]
    pd.testing.assert_frame_equal(resumed.to_frame(), full.to_frame())


def test_ungradable_gold_answers_become_item_errors(qwen) -> None:
    from vlm_probe.evaluation import Request

    requests = [Request("ok", 0, "what color ?", (), "B", choices=("red", "blue")),
                Request("bad", 1, "what color ?", (), "purple", choices=("red", "blue"))]
    rows, stats = run_requests(qwen, requests, generate=lambda batch: ["B", "A"][: len(batch)], quiet=True)
    assert rows[0]["correct"] is True and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "error" and rows[1]["error"].startswith("grading: The gold answer 'purple'")
    assert rows[1]["response"] == "A" and stats.failed == 1 and stats.generated == 1


def test_failure_rows_are_read_back_on_resume(tmp_path, qwen, zoo) -> None:
    data = _dataset(tmp_path, zoo("qwen2_5_vl"), n=3)
    (tmp_path / "data" / "img" / "junk.png").write_text("not an image")  # PIL's message holds an address
    lines = (tmp_path / "data" / "vqa.jsonl").read_text()
    (tmp_path / "data" / "vqa.jsonl").write_text(
        lines + json.dumps({"id": "junk", "question": "count", "image": "img/junk.png", "answer": "2"}) + "\n")

    def fake(batch):
        return ["The answer is 1."] * len(batch)

    fake.settings = {"generator": "fake"}
    first = evaluate(qwen, data, out=tmp_path / "run", generate=fake, quiet=True)
    again = evaluate(qwen, data, out=tmp_path / "run", generate=fake, quiet=True)  # a fresh load, resumed
    pd.testing.assert_frame_equal(first.to_frame(), again.to_frame())
    assert not first.failures()["error"].str.contains("0x").any()
    log = tmp_path / "run" / "rows" / "image.jsonl"
    rows = [json.loads(line) for line in _lines(log)]
    assert [r["id"] for r in rows if r["status"] == "error"] == ["broken", "junk"]
    for row in rows:  # what the log says is what a resumed run shows
        if row["id"] == "junk":
            row["error"] = "image: as logged by the first process"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    resumed = evaluate(qwen, data, out=tmp_path / "run", generate=fake, quiet=True)
    assert resumed.failures().set_index("id").loc["junk", "error"] == "image: as logged by the first process"
    assert len(_lines(log)) == len(rows), "logged failure rows were appended again"


def test_swap_pair_failure_rows_carry_their_answers(tmp_path, qwen, zoo) -> None:
    tv = zoo("qwen2_5_vl")
    folder = tmp_path / "pairs" / "counting"
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(3):
        tv.image(i, (32, 32)).save(folder / "images" / f"{i}_t.png")
        tv.image(i + 3, (32, 32)).save(folder / "images" / f"{i}_s.png")
        records.append({"id": f"p{i}", "task": "counting", "target_image": f"images/{i}_t.png",
                        "source_image": f"images/{i}_s.png", "prompt": "<image>How many?",
                        "meta": {"target_answer": str(i), "source_answer": str(i + 5)}})
    (folder / "images" / "1_t.png").write_text("broken")
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = evaluate(qwen, tmp_path / "pairs", conditions=["target", "source"],
                   generate=lambda batch: ["0"] * len(batch), quiet=True)
    failed = run.frame[run.frame["status"] == "error"].set_index("condition")
    assert failed["id"].tolist() == ["p1", "p1"]
    assert (failed.loc["target", "answer"], failed.loc["source", "answer"]) == ("1", "6")
    assert run.frame.set_index(["condition", "id"]).loc[("target", "p0"), "correct"]


def test_eval_command_quiet_hides_the_loading_bar(tmp_path, saved_model, zoo, capfd) -> None:
    from vlm_probe.commands.common import hf_progress_bars
    from transformers.utils import logging as hf_logging

    data = _dataset(tmp_path, zoo("qwen2_5_vl"), n=1, broken=False)
    parser = argparse.ArgumentParser(prog="vlm-probe")
    register(parser.add_subparsers(dest="command"))
    base = ["eval", str(saved_model), "--data", str(data), "--max-new-tokens", "2"]
    with hf_progress_bars(True):  # the session turned them off; a user's shell has them on
        args = parser.parse_args(base)
        assert args.func(args) == 0
        loud = capfd.readouterr().err
        args = parser.parse_args([*base, "-q"])
        assert args.func(args) == 0
        quiet = capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled(), "-q must not switch the bars off for the rest of the process"
    assert "Loading weights" in loud, "the test would prove nothing: no loading bar without -q"
    assert "Loading weights" not in quiet and "it/s" not in quiet, quiet[-500:]
