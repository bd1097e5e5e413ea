"""The main job end to end: on the reduced testbed (every section, verdicts that follow from the
saved tables, a report that renders in a real browser; in two worker processes, with the same
records and tables as in one) and on real swap pairs only (the prompt analyses run; the others
are listed as skipped, with the file that would enable them)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

import vlm_probe
import vlm_probe.threads
from vlm_probe.arch.regions import Cuts
from vlm_probe.cli import main
from vlm_probe.report import pipeline as pipeline_module
from vlm_probe.report.analyze import SECTIONS
from vlm_probe.report.claims import ClaimParameters, Verdict, judge
from vlm_probe.report.figures import check_figure
from vlm_probe.report.inputs import Inputs
from vlm_probe.report.pipeline import Options, Pipeline, Skip
from vlm_probe.report.render import build_report
from vlm_probe.report.summary import answer_first

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vision_swap_pairs"
needs_data = pytest.mark.skipif(not SHARED.is_dir(), reason=f"swap-pair data not found at {SHARED}")


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """``vlm-probe analyze --reduced`` with its defaults (every held-out item, the generation budget
    from the data's manifest or the default) in two worker processes, and what it printed."""
    root = tmp_path_factory.mktemp("analyze")
    return root / "out", _analyze_reduced(root, "out", "--workers", "2")


@pytest.fixture(scope="module")
def reduced_in_process(reduced):
    """The same analysis in this process (``--workers 1``; it must not reach the parallel path),
    single-threaded like the workers, on the same cached testbed."""
    root = reduced[0].parent
    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline_module, "run_in_workers", _no_workers)
    try:
        _analyze_reduced(root, "out_w1", "--workers", "1", "--threads", "1")
    finally:
        mp.undo()
    return root / "out_w1"


def _no_workers(*args, **kwargs):
    raise AssertionError("--workers 1 reached the parallel path")


def _analyze_reduced(root: Path, out: str, *args: str) -> str:
    """``vlm-probe analyze --reduced -q`` into ``root/out`` with the testbed cached in ``root/cache``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VLM_PROBE_CACHE", str(root / "cache"))
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            code = main(["analyze", "--reduced", "--out", str(root / out), "-q", *args])
    finally:
        mp.undo()
    assert code == 0, buffer.getvalue()
    return buffer.getvalue()


def _tables(out: Path, run: dict) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(out / f"{name}.parquet") for name in run["tables"]}


class _Sections(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id"):
            self.ids.append(attrs["id"])
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if tag in ("script", "link", "img", "iframe") and re.match(r"(https?:)?//", value):
                self.external.append(value)


def test_every_section_has_data_and_the_report_is_self_contained(reduced) -> None:
    out, _ = reduced
    html = (out / "report.html").read_text()
    parser = _Sections()
    parser.feed(html)
    assert parser.ids == ["summary"] + [name for name, _, _ in SECTIONS]
    assert not parser.external, f"the report loads {parser.external}"
    assert "Skipped:" not in html and "This analysis failed" not in html and "could not be drawn" not in html
    run = json.loads((out / "run.json").read_text())
    assert run["failures"] == {} and all(s["status"] == "ran" for s in run["sections"])
    assert html.count("Plotly.newPlot") >= len(SECTIONS) + 6
    assert {"torch", "transformers", "nnsight", "dtype", "attention", "checkpoints", "command", "model", "cuts",
            "summary", "paper"} <= set(run)
    assert run["options"]["max_new_tokens"] >= 24 and run["options"]["max_new_tokens_source"]
    assert set(run["options"]["claims"]) >= {"accuracy_margin", "share_margin", "transition_margin",
                                             "min_transition_drop", "attention_margin", "energy_margin"}
    for table in run["tables"]:
        assert len(pd.read_parquet(out / f"{table}.parquet")) > 0, table
    assert "2602.12395" in html and "testbed" in run["model"]["description"]


def test_every_section_states_its_sample(reduced) -> None:
    out, printed = reduced
    run = json.loads((out / "run.json").read_text())
    data = {role: Path(path) for role, path in run["data"].items()}
    n_swap = sum(1 for _ in data["swap"].open())
    for section in run["sections"]:
        assert section["samples"], section["id"]
        assert section["id"] in printed
    swap = next(s for s in run["sections"] if s["id"] == "swap")
    assert swap["samples"][0].startswith(f"n = {n_swap} swap pairs (")  # every pair, with its tasks


def test_verdicts_are_the_claims_applied_to_the_saved_tables(reduced) -> None:
    out, printed = reduced
    run = json.loads((out / "run.json").read_text())
    tables = _tables(out, run)
    params = ClaimParameters(**run["options"]["claims"])
    cuts = Cuts(**run["cuts"])
    again = judge(tables, cuts=cuts, params=params)
    assert [c.as_dict() for c in again] == run["claims"]
    assert {c["verdict"] for c in run["claims"]} <= {v.value for v in Verdict}
    assert answer_first(tables, again, cuts, params) == run["summary"]
    html = (out / "report.html").read_text()
    shown = re.findall(r'<div class="verdict [^"]+">([^<]+)</div>', html)
    assert shown == [c.verdict.value for c in again]
    for claim in again:  # the terminal states every claim whole, with its verdict
        flat = " ".join(printed.split())
        assert f"{claim.verdict.value} {claim.text}" in flat


def test_report_is_drawn_from_the_tables_alone(reduced, tmp_path) -> None:
    out, printed = reduced
    copy_dir = tmp_path / "copy"
    shutil.copytree(out, copy_dir)
    (copy_dir / "report.html").unlink()
    assert main(["report", str(copy_dir)]) == 0
    assert (copy_dir / "report.html").is_file()
    report = build_report(copy_dir)
    for section in report.sections:
        assert section.figures, section.id
        for figure in section.figures:
            assert check_figure(figure) == [], (section.id, figure.layout.title.text, check_figure(figure))
    assert re.search(r"total \d+ s: inputs and testbed \d+ s, analyses \d+ s", printed)


def test_workers_give_the_records_and_tables_of_one_process(reduced, reduced_in_process) -> None:
    """Exact equality: both runs are single-threaded on the same CPU with the same seeds, so every
    number is computed by the same kernels in the same order (other thread counts may differ in
    the last bits, which is why the in-process run is given --threads 1)."""
    parallel_out, serial_out = reduced[0], reduced_in_process
    parallel, serial = (json.loads((out / "run.json").read_text()) for out in (parallel_out, serial_out))
    assert (parallel["options"]["workers"], serial["options"]["workers"]) == (2, 1)

    def records(run: dict) -> list[dict]:
        return [{k: v for k, v in section.items() if k != "seconds"} for section in run["sections"]]

    assert records(parallel) == records(serial)
    assert [s["id"] for s in parallel["sections"]] == [name for name, _, _ in SECTIONS]
    assert parallel["tables"] == serial["tables"] and len(serial["tables"]) >= len(SECTIONS)
    for name in serial["tables"]:
        pd.testing.assert_frame_equal(pd.read_parquet(parallel_out / f"{name}.parquet"),
                                      pd.read_parquet(serial_out / f"{name}.parquet"), check_exact=True, obj=name)
    figures = sorted(p.name for p in (serial_out / "figures").iterdir())
    assert figures and figures == sorted(p.name for p in (parallel_out / "figures").iterdir())
    for name in figures:
        assert (parallel_out / "figures" / name).read_text() == (serial_out / "figures" / name).read_text(), name
    # judged in memory from the tables the parent read back: the same verdicts and sentences
    assert parallel["claims"] == serial["claims"] and parallel["summary"] == serial["summary"]


def _raises(p: Pipeline, rec) -> None:
    raise ValueError("broken on purpose")


def _skips(p: Pipeline, rec) -> None:
    raise Skip("Nothing to do here.", "--data with something")


def _saves(p: Pipeline, rec) -> None:
    rec.samples.append("n = 3 numbers")
    p.save_table(rec, "numbers", pd.DataFrame({"x": [1, 2, 3], "y": [0.5, 0.25, 0.125]}))
    p.save_table(rec, "letters", pd.DataFrame({"letter": ["a", "b"]}))


def _crashes(p: Pipeline, rec) -> None:
    os._exit(3)  # a worker process that dies (only ever run in a worker)


def test_a_section_that_fails_in_a_worker_is_recorded_and_the_others_run(tmp_path, capfd) -> None:
    inputs = Inputs(checkpoints={}, data={})  # the sections here read no model and no data
    pipeline = Pipeline(inputs, tmp_path, Options(workers=2))
    pipeline.run((("boom", "Boom", _raises), ("saves", "Saves", _saves), ("nothing", "Nothing", _skips)))
    boom, ran, skipped = pipeline.records
    assert (boom.id, boom.status, boom.reason) == ("boom", "failed", "ValueError: broken on purpose")
    assert (skipped.id, skipped.status, skipped.reason, skipped.enable) == (
        "nothing", "skipped", "Nothing to do here.", "--data with something")
    assert (ran.id, ran.status, ran.samples, ran.tables) == ("saves", "ran", ["n = 3 numbers"], ["numbers", "letters"])
    assert list(pipeline.tables) == ran.tables  # read back into the parent, as saved
    pd.testing.assert_frame_equal(pipeline.tables["numbers"], pd.DataFrame({"x": [1, 2, 3], "y": [0.5, 0.25, 0.125]}))
    assert "[vlm-probe] Saves ..." in capfd.readouterr().err  # printed by the worker

    crashed = pipeline_module.run_in_workers(pipeline, (("crash", "Crash", _crashes),), 1)  # one process, dies
    assert [(r.id, r.status) for r in crashed] == [("crash", "failed")]
    assert crashed[0].reason.startswith("BrokenProcessPool: ")


def test_default_workers_use_the_cores_on_cpu_and_one_on_an_accelerator(monkeypatch) -> None:
    monkeypatch.setattr(vlm_probe.threads, "usable_cores", lambda: 2)
    assert Options().resolved_workers(len(SECTIONS)) == 2
    assert Options(load={"device_map": {"": "cpu"}}).resolved_workers(len(SECTIONS)) == 2
    assert Options(workers=1).resolved_workers(len(SECTIONS)) == 1
    for placement in ("auto", {"": "cuda:0"}, {"model.vision": "cpu", "model.language_model": 0}):
        assert Options(load={"device_map": placement}).resolved_workers(len(SECTIONS)) == 1, placement
    monkeypatch.setattr(vlm_probe.threads, "usable_cores", lambda: 64)
    assert Options().resolved_workers(len(SECTIONS)) == vlm_probe.threads.default_workers() <= len(SECTIONS)
    assert Options().resolved_workers(3) == 3


def test_workers_zero_is_refused(capsys) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["analyze", "--reduced", "--workers", "0"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers" in err and "at least 1" in err


def test_bad_arguments_fail_before_any_work(tmp_path, capsys) -> None:
    assert main(["analyze", "--in", str(tmp_path / "nope"), "--rl", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    assert main(["analyze", "--in", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "both --in and --rl" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoints_cuts_and_data_fail_before_any_work(tmp_path, zoo, capsys) -> None:
    qwen = str(zoo("qwen2_5_vl").save(tmp_path / "qwen"))
    wider = str(zoo("qwen2_5_vl", d_mlp=96).save(tmp_path / "wider"))
    llava = str(zoo("llava").save(tmp_path / "llava"))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "text.jsonl").write_text(json.dumps({"id": "a", "question": "1 + 1 ?", "answer": "2"}) + "\n")
    (broken / "manifest.json").write_text(json.dumps({"generation": {"max_new_tokens": "many"}}))
    out = str(tmp_path / "out")
    cases = [
        (["--in", qwen, "--rl", llava], "LLaVA"),
        (["--in", qwen, "--rl", wider], "one architecture"),
        (["--in", str(unknown), "--rl", qwen], "register"),
        (["--in", qwen, "--rl", qwen, "--cuts", "9,x"], "two integers"),
        (["--in", qwen, "--rl", qwen, "--cuts", "1,99"], "non-empty parts"),
        (["--in", qwen, "--rl", qwen, "--data", str(empty)], "holds none of"),
        (["--in", qwen, "--rl", qwen, "--data", str(broken)], "max_new_tokens must be a positive integer"),
    ]
    for args, message in cases:
        assert main(["analyze", *args, "--out", out, "-q"]) == 2, args
        assert message in capsys.readouterr().err, args


def _swap_folder(root: Path, per_task: int = 3) -> Path:
    """A copy of the published swap pairs (two tasks, published layout), a few pairs per task."""
    for task in ("counting", "grounding"):
        lines = (SHARED / task / "data.jsonl").read_text().splitlines()[:per_task]
        (root / task / "images").mkdir(parents=True)
        (root / task / "data.jsonl").write_text("\n".join(lines) + "\n")
        for line in lines:
            record = json.loads(line)
            for key in ("target_image", "source_image"):
                shutil.copy(SHARED / task / record[key], root / task / record[key])
    return root


@needs_data
def test_swap_pairs_alone_run_every_prompt_analysis(tmp_path, zoo, capsys) -> None:
    tiny = zoo("qwen2_5_vl")
    tiny.save(tmp_path / "IN")
    rl = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    rl.save_pretrained(tmp_path / "RL")
    vlm_probe.model.processors.save_processor(tiny.processor, tmp_path / "RL")
    data = _swap_folder(tmp_path / "pairs")
    out = tmp_path / "out"
    code = main(["analyze", "--in", str(tmp_path / "IN"), "--rl", str(tmp_path / "RL"), "--data", str(data),
                 "--out", str(out), "--max-new-tokens", "3", "-q"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    run = json.loads((out / "run.json").read_text())
    status = {s["id"]: s for s in run["sections"]}
    for name in ("weights", "swap", "cross_patching", "attention", "lens", "drift"):
        assert status[name]["status"] == "ran", (name, status[name]["reason"])
    for name in ("cross_patching", "attention", "drift"):
        assert status[name]["samples"] == ["n = 6 swap targets (counting 3, grounding 3)"]
    assert {"cross_patching", "attention_mass", "drift", "logit_lens", "swap_IN"} <= set(run["tables"])
    skipped = {name: status[name] for name in ("ablation", "transfer", "freezing")}
    assert all(s["status"] == "skipped" for s in skipped.values())
    assert "text.jsonl" in skipped["ablation"]["reason"] and "text.jsonl" in skipped["ablation"]["enable"]
    assert "perception.jsonl" in skipped["transfer"]["enable"] and "testbed" in skipped["freezing"]["reason"]
    html = (out / "report.html").read_text()
    for record in skipped.values():
        assert record["enable"] in html
        assert f"skipped {record['title']}" in " ".join(printed.split())
    claims = {c["id"]: c["verdict"] for c in run["claims"]}
    assert claims["transfer"] == claims["freezing"] == "not tested"
    assert run["options"]["max_new_tokens"] == 3 and run["options"]["max_new_tokens_source"] == "--max-new-tokens"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian packages chromium, "
                    "chromium-driver; .ci/run installs them)")
def test_report_renders_in_headless_chromium(reduced, tmp_path) -> None:
    out, _ = reduced
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=10000", "--dump-dom", (out / "report.html").as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console
    rendered = len(re.findall(r'class="[^"]*\bjs-plotly-plot\b', proc.stdout))
    expected = (out / "report.html").read_text().count("Plotly.newPlot")
    assert rendered == expected > 0, f"{rendered} of {expected} figures rendered"
