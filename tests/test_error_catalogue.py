"""The error catalogue (issue 17): every wrong input gets a specific, actionable error, and
nothing is left on disk. One parametrized test per group; docs/reference/errors.md lists them.

Each case is ``(setup, act, expected, words)``: ``setup(env)`` writes what the case needs under
``env.tmp`` (real files: truncated and corrupt safetensors, files where folders go), then the
whole tree is snapshotted, ``act(env)`` runs, and the tree must be unchanged (no half-written
or hidden leftovers). ``expected`` is an error class, a warning class, or ``2`` for a command
that must exit 2 with one line on stderr (no traceback).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlm_probe
import vlm_probe.model.checkpoint_set
from vlm_probe import errors as E
from vlm_probe.analyses import metrics as M
from vlm_probe.analyses.ablation import knockout_sweep
from vlm_probe.analyses.collect import Activations, collect
from vlm_probe.analyses.lens import logit_lens
from vlm_probe.analyses.patching import cross_checkpoint_sweep, sweep
from vlm_probe.analyses.probes import probe_layers
from vlm_probe.cli import main
from vlm_probe.evaluation import evaluate
from vlm_probe.commands.common import parse_layers
from vlm_probe.interventions import knockout
from vlm_probe.results import Result
from vlm_probe.testbed.zoo import tiny_vlm
from vlm_probe.weights.compare import NonFiniteWeightsWarning
from vlm_probe.weights.merge import write_merge
from vlm_probe.weights.plans import MergePlan, thirds_plan

IMG = Image.new("RGB", (64, 64), (200, 30, 30))
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@dataclass
class Env:
    """What a case can use: a scratch folder and the shared tiny models and checkpoints."""

    tmp: Path
    vlm: Any  # the session's tiny Qwen2.5-VL
    ckpt: Path  # a saved tiny Qwen2.5-VL checkpoint (read-only for cases: copy before damaging)
    other: Path  # a second checkpoint of the same architecture (another seed)
    capsys: Any
    state: dict[str, Any]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("catalogue")
    return {"IN": tiny_vlm("qwen2_5_vl").save(root / "IN"), "RL": tiny_vlm("qwen2_5_vl", seed=1).save(root / "RL")}


@pytest.fixture
def env(tmp_path, qwen, saved, capsys) -> Env:
    work = tmp_path / "work"
    work.mkdir()
    return Env(work, qwen, saved["IN"], saved["RL"], capsys, {})


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` (hidden ones included) with its size (-1 for folders)."""
    return {p.relative_to(root).as_posix(): (-1 if p.is_dir() else p.stat().st_size) for p in root.rglob("*")}


def _copy(env: Env, name: str) -> Path:
    return Path(shutil.copytree(env.ckpt, env.tmp / name))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _dataset(env: Env) -> Path:
    path = env.tmp / "text.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "question": "how many ?", "answer": "3"}) + "\n"
                            for i in range(2)))
    return path


def _run(env: Env, act: Callable[[Env], Any], expected: Any, words: tuple[str, ...]) -> None:
    if expected == 2:
        code = act(env)
        err = env.capsys.readouterr().err
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
        assert len(lines) == 1, err
        assert "Traceback" not in err and lines[0].startswith("vlm-probe"), err
        text = lines[0]
    elif isinstance(expected, type) and issubclass(expected, Warning):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            act(env)
        found = [w for w in caught if issubclass(w.category, expected)]
        assert found, [str(w.message) for w in caught]
        text = str(found[0].message)
    else:
        with pytest.raises(expected) as info:
            act(env)
        assert isinstance(info.value, E.VLMProbeError), type(info.value)
        text = str(info.value)
    for word in words:
        assert word.lower() in text.lower(), f"{word!r} not in: {text}"


def _check(env: Env, case: tuple) -> None:
    setup, act, expected, words, *leaves = case
    if setup is not None:
        setup(env)
    before = _tree(env.tmp)
    _run(env, act, expected, words)
    after = _tree(env.tmp)
    allowed = set(leaves[0]) if leaves else set()  # folders a case may write (with what is under them)
    left = [p for p in set(after) - set(before) if not any(p == a or p.startswith(a + "/") for a in allowed)]
    changed = [p for p in before if after.get(p) != before[p]]
    assert not left and not changed, f"left on disk: {sorted(left)}; changed or removed: {sorted(changed)}"


# ----------------------------------------------------------------------------- 1. silent wrong results


def _nan_model(env: Env) -> Any:
    tiny = tiny_vlm("qwen2_5_vl")
    with torch.no_grad():
        tiny.model.model.language_model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    return vlm_probe.load(tiny)


def _nan_checkpoint(env: Env) -> None:
    bad = _copy(env, "nan")
    state = load_file(bad / "model.safetensors")
    key = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})


def _text_only(env: Env) -> Any:
    return env.vlm.prepare(["how many ?"], answers=["3"])


def _two_wrappers(env: Env) -> dict[str, Any]:
    return {"IN": env.vlm, "RL": vlm_probe.load(tiny_vlm("qwen2_5_vl"))}  # same weights, two objects


def _lens_last(env: Env) -> None:
    batch = env.vlm.prepare(["how many ?"], [[IMG]])
    env.state["lens"] = (logit_lens(env.vlm, batch, positions="last", layers=[0], progress=False), batch)


def _acts(env: Env) -> Any:
    batch = env.vlm.prepare(["how many ?", "what colour ?"], [[IMG], [IMG]])
    return collect(env.vlm, batch, layers=[0], groups=("last",), progress=False)


def _merge_dup(env: Env) -> int:
    return main(["merge", "--ckpt", f"IN={env.ckpt}", "--ckpt", f"IN={env.other}", "--preset", "IN:IN:IN",
                 "--out", str(env.tmp / "m"), "-q"])


def _save_over_file(env: Env) -> None:
    (env.tmp / "result").write_text("precious")


SILENT = {
    "check-nan-weights": (None, lambda env: _nan_model(env).check(), E.CheckpointError, ("NaN", "up_proj")),
    "write-merge-nan-input": (_nan_checkpoint, lambda env: write_merge(
        thirds_plan("IN:IN:IN"), {"IN": env.tmp / "nan"}, env.tmp / "merged", progress=False),
        NonFiniteWeightsWarning, ("NaN", "up_proj"), {"merged"}),  # the merge is written, with a warning
    "logit-diff-multi-token": (None, lambda env: M.logit_diff(env.vlm.tokenizer, "red circle", "red square", 1),
                               E.InputError, ("'red circle'", "2 tokens", "single token")),
    "target-prob-unknown-word": (None, lambda env: M.target_prob(env.vlm.tokenizer, "zebra", 1), E.InputError,
                                 ("zebra", "unknown token")),
    "logit-diff-target-is-foil": (None, lambda env: M.logit_diff(env.vlm.tokenizer, "3", "3", 1), E.InputError,
                                  ("same token", "foil")),
    "targets-wrong-length": (None, lambda env: M.target_prob(env.vlm.tokenizer, ["3", "4", "5"], 2), E.InputError,
                             ("3 tokens for 2 samples",)),
    "cross-sweep-a-equals-b": (None, lambda env: cross_checkpoint_sweep(
        _two_wrappers(env), env.vlm.prepare("how many ?", [IMG]), a="IN", b="IN"), E.InputError,
        ("same checkpoint", "two different")),
    "restored-undefined-warns": (None, lambda env: cross_checkpoint_sweep(
        _two_wrappers(env), env.vlm.prepare("how many ?", [IMG]), layers=[0], both=False, progress=False),
        UserWarning, ("undefined", "1 of 1 sample", "agree")),
    "text-only-vision-sweep": (None, lambda env: sweep(env.vlm, clean=_text_only(env), corrupt=_text_only(env),
                                                       positions="vision", layers=[0], progress=False),
                               E.InputError, ("'vision' is empty in every sample", "text-only", "question")),
    "text-only-vision-knockout": (None, lambda env: knockout_sweep(
        env.vlm, _text_only(env), layers=[0], progress=False), E.InputError, ("'vision' is empty", "knockout")),
    "knockout-mask-wrong-shape": (None, lambda env: _knock(env, torch.ones(1, 5, dtype=torch.bool)), E.InputError,
                                  ("[batch, total]", "(1, 5)")),
    "knockout-mask-no-batch": (None, lambda env: _knock(env, torch.ones(1, 5, dtype=torch.bool), with_batch=False),
                               E.InputError, ("[batch, >= ", "(1, 5)")),
    "knockout-sweep-short-mask": (None, lambda env: knockout_sweep(
        env.vlm, env.vlm.prepare("how many ?", [IMG], answers=["3"]), queries=torch.ones(1, 5, dtype=torch.bool),
        layers=[0], progress=False), E.InputError, ("knockout_sweep queries", "(1, 5)")),
    "result-save-over-file": (_save_over_file, lambda env: Result(__import__("pandas").DataFrame({"a": [1]})).save(
        env.tmp / "result"), E.InputError, ("existing file", "not a directory")),
    "lens-overlay-without-vision": (_lens_last, lambda env: env.state["lens"][0].overlay(env.state["lens"][1], layer=0),
                                    E.InputError, ("no vision-token positions", "positions='vision'")),
    "probe-one-class": (None, lambda env: probe_layers(_acts(env), ["a", "a"], seeds=(0,)), E.InputError,
                        ("two classes", "'a'")),
    "probe-wrong-length-labels": (None, lambda env: probe_layers(_acts(env), ["a", "b", "c"], seeds=(0,)),
                                  E.InputError, ("3 labels for 2", "one label per sample")),
    "lens-wrong-length-targets": (None, lambda env: logit_lens(env.vlm, env.vlm.prepare("how many ?", [IMG]),
                                                               targets=[1, 2], progress=False),
                                  E.InputError, ("2 targets for 1 samples",)),
    "activations-load-missing": (None, lambda env: Activations.load(env.tmp / "nope"), E.InputError,
                                 ("does not exist", "collect()")),
    "result-load-missing": (None, lambda env: Result.load(env.tmp / "nope"), E.InputError, ("does not exist",)),
    "layout-typo": (None, lambda env: env.vlm.prepare("how many ?", [IMG]).layout.visoin, E.GroupNameError,
                    ("'visoin'", "vision", "question")),
    "batch-row-out-of-range": (None, lambda env: env.vlm.prepare("how many ?", [IMG])[5], E.RowIndexError,
                               ("Row 5", "1 row")),
    "merge-repeated-ckpt-name": (None, _merge_dup, 2, ("--ckpt IN is given twice",)),
}


def _knock(env: Env, mask: torch.Tensor, with_batch: bool = True) -> None:
    batch = env.vlm.prepare("how many ?", [IMG])
    with env.vlm.trace(batch):
        knockout(env.vlm, 0, mask, mask, batch=batch if with_batch else None)


@pytest.mark.parametrize("case", list(SILENT), ids=list(SILENT))
def test_silent_wrong_results_are_refused(env, case) -> None:
    _check(env, SILENT[case])


# ----------------------------------------------------------------------------- 2. crashes inside dependencies


def _damaged(kind: str) -> Callable[[Env], None]:
    def setup(env: Env) -> None:
        bad = _copy(env, kind)
        weights = bad / "model.safetensors"
        if kind == "truncated":
            _truncate(weights)
        elif kind == "corrupt":
            weights.write_bytes(b"\x00not a safetensors file" * 4)
        elif kind == "incomplete":  # a tensor missing: transformers would initialise it at random
            state = load_file(weights)
            state.pop(next(k for k in state if k.endswith("mlp.up_proj.weight")))
            save_file(state, weights, metadata={"format": "pt"})
        elif kind == "missing-shard":
            index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + i % 2}-of-00002.safetensors"
                                                    for i, k in enumerate(load_file(weights))}}
            state = load_file(weights)
            save_file({k: v for k, v in state.items() if index["weight_map"][k].startswith("model-00001")},
                      bad / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
            weights.unlink()
            (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        elif kind == "bad-config":
            (bad / "config.json").write_text("{not json")
    return setup


def _load(name: str, **options: Any) -> Callable[[Env], Any]:
    return lambda env: vlm_probe.load(env.tmp / name, **options)


CRASHES = {
    "load-truncated": (_damaged("truncated"), _load("truncated"), E.CorruptCheckpointError,
                       ("truncated/model.safetensors", "truncated or damaged")),
    "load-corrupt": (_damaged("corrupt"), _load("corrupt"), E.CorruptCheckpointError,
                     ("corrupt/model.safetensors", "header")),
    "load-incomplete": (_damaged("incomplete"), _load("incomplete"), E.CheckpointError,
                        ("lacks 1", "up_proj", "incomplete")),
    "load-missing-shard": (_damaged("missing-shard"), _load("missing-shard"), E.MissingShardError,
                           ("model-00002-of-00002.safetensors", "not there")),
    "load-bad-config": (_damaged("bad-config"), _load("bad-config"), E.CorruptCheckpointError,
                        ("config.json", "not valid JSON")),
    "load-missing-path": (None, _load("nope"), E.CheckpointError, ("does not exist",)),
    "load-uncached-hub-id": (None, lambda env: vlm_probe.load("no-such-org/no-such-model"), E.CheckpointError,
                             ("not in the local hub cache", "offline")),
    "load-dtype-typo": (None, lambda env: vlm_probe.load(env.ckpt, dtype="bf61"), E.InputError,
                        ("'bf61'", "bf16", "float32")),
    "load-attn-typo": (None, lambda env: vlm_probe.load(env.ckpt, attn_implementation="sdap"), E.InputError,
                       ("'sdap'", "sdpa", "eager")),
    "load-device-map-typo": (None, lambda env: vlm_probe.load(env.ckpt, device_map="gpu"), E.InputError,
                             ("'gpu'", "auto", "cuda:N")),
    "load-set-bad-option": (None, lambda env: vlm_probe.load_set(IN=env.ckpt, RL=env.other, dtype="bf61"),
                            E.InputError, ("'bf61'",)),
    "load-set-unknown-option": (None, lambda env: vlm_probe.load_set(IN=env.ckpt, options={"dtpye": "bf16"}),
                                E.InputError, ("dtpye", "dtype")),
    "prepare-0x0-image": (None, lambda env: env.vlm.prepare("x", [Image.new("RGB", (0, 0))]), E.InputError,
                          ("0x0", "too small")),
    "cross-sweep-single-model": (None, lambda env: cross_checkpoint_sweep(env.vlm, env.vlm.prepare("x", [IMG])),
                                 E.InputError, ("checkpoint set", "load_set")),
    "cross-sweep-unknown-name": (None, lambda env: cross_checkpoint_sweep(
        {"IN": env.vlm, "RL": env.vlm}, env.vlm.prepare("x", [IMG]), a="IN", b="Rl"), E.InputError,
        ("'Rl'", "IN, RL")),
    "checkpoint-set-typo": (None, lambda env: vlm_probe.model.checkpoint_set.CheckpointSet({"IN": env.vlm})["Rl"],
                            E.UnknownKeyError, ("'Rl'", "it has IN")),
    "activations-key-typo": (None, lambda env: _acts(env)[("model", "layer_out", 0, "lats")], E.UnknownKeyError,
                             ("lats", "collected")),
    "testbed-family-typo": (None, lambda env: __import__("vlm_probe.testbed.recipe", fromlist=["Recipe"]).Recipe(
        family="lava"), E.InputError, ("'lava'", "llava")),
    "plan-not-yaml": (None, lambda env: MergePlan.from_yaml("host: [IN\n"), E.MergePlanError, ("not valid YAML",)),
    "plan-not-a-mapping": (None, lambda env: MergePlan.from_yaml("- IN\n- RL\n"), E.MergePlanError,
                           ("Not a merge plan",)),
    "merge-bad-shard-size": (None, lambda env: write_merge(thirds_plan("IN:IN:IN"), {"IN": env.ckpt},
                                                           env.tmp / "m", max_shard_size="two GB"),
                             E.InputError, ("'two GB'", "2GB")),
}


@pytest.mark.parametrize("case", list(CRASHES), ids=list(CRASHES))
def test_dependency_crashes_become_clear_errors(env, case) -> None:
    _check(env, CRASHES[case])


# ----------------------------------------------------------------------------- 3. the command line


def _cli(*args: str | Callable[[Env], str]) -> Callable[[Env], int]:
    def run(env: Env) -> int:
        try:
            return main([a(env) if callable(a) else a for a in args])
        except SystemExit as exit:  # argparse's own errors (what the console script returns)
            return int(exit.code or 0)
    return run


def _swap(*extra: str | Callable[[Env], str]) -> Callable[[Env], int]:
    return _cli("swap", lambda env: str(env.ckpt), "--data", lambda env: str(_dataset(env)),
                "--out", lambda env: str(env.tmp / "out"), *extra)


def _eval(model: Callable[[Env], str], *extra: str | Callable[[Env], str]) -> Callable[[Env], int]:
    return _cli("eval", model, "--data", lambda env: str(_dataset(env)), "--out", lambda env: str(env.tmp / "run"),
                "-q", *extra)


def _merge(*extra: str | Callable[[Env], str]) -> Callable[[Env], int]:
    return _cli("merge", "--ckpt", lambda env: f"IN={env.ckpt}", "--ckpt", lambda env: f"RL={env.other}", "-q",
                *extra)


def _file(name: str, text: str = "x") -> Callable[[Env], None]:
    return lambda env: (env.tmp / name).write_text(text)


def _with_data(setup: Callable[[Env], None] | None = None) -> Callable[[Env], None]:
    def both(env: Env) -> None:
        _dataset(env)
        if setup is not None:
            setup(env)
    return both


def _damaged_with_data(kind: str) -> Callable[[Env], None]:
    return _with_data(_damaged(kind))


def _existing_merge(env: Env) -> None:
    (env.tmp / "m").mkdir()
    (env.tmp / "m" / "keep.txt").write_text("x")


COMMAND_LINE = {
    "layers-backwards": (_with_data(), _swap("--layers", "3-1"), 2, ("--layers", "runs backwards", "1-3")),
    "layers-not-a-number": (_with_data(), _swap("--layers", "abc"), 2, ("--layers", "'abc'", "0-27")),
    "layers-mixed-signs": (_with_data(), _swap("--layers", "0--1"), 2, ("--layers", "mixes")),
    "dtype-typo": (_with_data(), _eval(lambda env: str(env.ckpt), "--dtype", "bf61"), 2, ("--dtype", "bf16")),
    "attn-typo": (_with_data(), _eval(lambda env: str(env.ckpt), "--attn", "sdap"), 2, ("--attn", "sdpa")),
    "device-map-typo": (_with_data(), _eval(lambda env: str(env.ckpt), "--device-map", "gpu"), 2,
                        ("--device-map", "'gpu'", "auto")),
    "batch-size-zero": (_with_data(), _eval(lambda env: str(env.ckpt), "--batch-size", "0"), 2,
                        ("--batch-size", "at least 1")),
    "max-new-tokens-negative": (_with_data(), _eval(lambda env: str(env.ckpt), "--max-new-tokens", "-1"), 2,
                                ("--max-new-tokens", "at least 1")),
    "eval-corrupt-checkpoint": (_damaged_with_data("truncated"), _eval(lambda env: str(env.tmp / "truncated")), 2,
                                ("truncated/model.safetensors", "truncated or damaged")),
    "eval-missing-checkpoint": (_with_data(), _eval(lambda env: str(env.tmp / "nope")), 2, ("does not exist",)),
    "out-is-a-file": (_with_data(_file("out")), _swap(), 2, ("--out", "existing file")),
    "out-under-a-file": (_with_data(_file("blocker")), _cli(
        "swap", lambda env: str(env.ckpt), "--data", lambda env: str(env.tmp / "text.jsonl"),
        "--out", lambda env: str(env.tmp / "blocker" / "out")), 2, ("--out", "blocker is a file")),
    "plan-file-missing": (None, _merge("--plan", "no-such-plan.yaml", "--out", lambda env: str(env.tmp / "m")), 2,
                          ("--plan", "does not exist")),
    "merge-existing-out": (_existing_merge, _merge("--preset", "IN:RL:RL", "--out", lambda env: str(env.tmp / "m")),
                           2, ("already exists", "--overwrite")),
    "mergekit-cannot-express": (None, _merge("--preset", "IN:RL:RL", "--out", lambda env: str(env.tmp / "m"),
                                             "--mergekit", lambda env: str(env.tmp / "mk.yml")), 2,
                                ("final norm and lm_head",)),
    "merge-cuts-typo": (None, _merge("--preset", "IN:RL:RL", "--cuts", "2;4", "--out", lambda env: str(env.tmp / "m")),
                        2, ("--cuts", "two integers", "9,18")),
    "merge-shard-size-typo": (None, _merge("--preset", "IN:RL:RL", "--max-shard-size", "big",
                                           "--out", lambda env: str(env.tmp / "m")), 2, ("--max-shard-size", "2GB")),
    "weights-corrupt-checkpoint": (_damaged("corrupt"), _cli("weights", lambda env: str(env.ckpt),
                                                             lambda env: str(env.tmp / "corrupt"), "--quiet"), 2,
                                   ("corrupt/model.safetensors",)),
    "weights-top-k-zero": (None, _cli("weights", "a", "b", "--top-k", "0"), 2, ("--top-k", "at least 1")),
    "threads-zero": (None, _cli("weights", "a", "b", "--threads", "0"), 2, ("threads must be at least 1",)),
    "analyze-samples-zero": (None, _cli("analyze", "--samples", "0"), 2, ("--samples", "at least 1")),
    "eval-api-batch-size-zero": (_with_data(), lambda env: evaluate(
        env.vlm, env.tmp / "text.jsonl", out=env.tmp / "run", batch_size=0), E.InputError, ("batch_size", "at least 1")),
    "eval-by-typo": (_with_data(), _eval(lambda env: str(env.ckpt), "--by", "colour"), 2,
                     ("--by", "'colour'", "category")),
    "testbed-family-typo": (None, _cli("testbed", "build", "--family", "lava", "--reduced", "--cache-dir",
                                       lambda env: str(env.tmp / "cache")), 2, ("'lava'", "llava")),
    "report-not-a-run": (None, _cli("report", lambda env: str(env.tmp)), 2, ("no run.json", "vlm-probe analyze")),
    "unknown-subcommand-option": (None, _cli("eval", "x", "--data", "y", "--bach-size", "2"), 2,
                                  ("unrecognized arguments", "--help")),
}


@pytest.mark.parametrize("case", list(COMMAND_LINE), ids=list(COMMAND_LINE))
def test_command_line_mistakes_exit_2(env, case) -> None:
    _check(env, COMMAND_LINE[case])


@pytest.mark.skipif(ROOT, reason="running as root: a chmod-read-only folder stays writable for root "
                    "(the path-under-a-file case covers unwritable --out for every user)")
def test_read_only_out_exits_2(env) -> None:
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _dataset(env)
        _check(env, (None, _cli("swap", str(env.ckpt), "--data", str(env.tmp / "text.jsonl"),
                                "--out", str(locked / "out")), 2, ("--out", "not writable")))
    finally:
        locked.chmod(0o755)


# ----------------------------------------------------------------------------- what must keep working


def test_accepted_inputs_still_work(env, saved) -> None:
    """The fixes refuse only mistakes: negative layers, position lists, load options in load_set."""
    assert parse_layers("-1") == [-1] and parse_layers("-3--1") == [-3, -2, -1] and parse_layers("0-2,5") == [0, 1, 2, 5]
    batch = env.vlm.prepare("how many ?", [IMG])
    with env.vlm.trace(batch):  # position lists, as patch() takes them
        knockout(env.vlm, 0, [batch.width - 1], [1, 2], batch=batch)
        knocked = env.vlm.lm_head.output.save()
    assert knocked.shape[1] == batch.width
    pair = vlm_probe.load_set(IN=saved["IN"], RL=saved["RL"], dtype="float32")
    assert list(pair) == ["IN", "RL"] and pair["RL"].hf.dtype == torch.float32
    assert vlm_probe.load(saved["IN"]).check()["trace_vs_plain"] < 1e-4


def test_negative_layers_reach_the_analysis(env, capsys) -> None:
    """``--layers=-1`` parses; the command then fails on the (missing) data, not on the layers."""
    assert main(["swap", str(env.ckpt), "--data", str(env.tmp / "none.jsonl"), "--out", str(env.tmp / "o"),
                 "--layers=-1"]) == 2
    err = capsys.readouterr().err
    assert "--layers" not in err and "none.jsonl" in err


def test_debug_shows_the_traceback(env, monkeypatch) -> None:
    args = ["swap", str(env.ckpt), "--data", "x", "--out", str(env.tmp / "o"), "--layers", "3-1"]
    with pytest.raises(E.InputError, match="runs backwards"):
        main(["--debug", *args])
    with pytest.raises(E.InputError, match="runs backwards"):
        main([*args, "--debug"])
    monkeypatch.setenv("VLM_PROBE_DEBUG", "1")
    with pytest.raises(E.InputError, match="runs backwards"):
        main(args)


def test_the_installed_command_prints_one_line_and_a_traceback_only_with_debug(tmp_path) -> None:
    command = [sys.executable, "-m", "vlm_probe.cli", "merge", "--ckpt", "IN=.", "--ckpt", "IN=.", "--preset",
               "IN:IN:IN", "--out", str(tmp_path / "m")]
    environment = {**os.environ, "VLM_PROBE_DEBUG": ""}
    plain = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines() == ["vlm-probe merge: error: --ckpt IN is given twice (. and .); "
                                                 "give each name once."]
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=environment, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert not (tmp_path / "m").exists()


def test_per_family_refusals(zoo, family) -> None:
    """Per-family behaviour: a 0x0 image, an empty vision group and a short knockout mask are
    refused in every family (Gemma3 used to accept the 0x0 image silently)."""
    vlm = vlm_probe.load(zoo(family))
    with pytest.raises(E.InputError, match="too small"):
        vlm.prepare("x", [Image.new("RGB", (0, 0))])
    if family == "paligemma":  # its processor needs an image with every prompt: said as such
        with pytest.raises(E.InputError, match="without an image"):
            vlm.prepare(["how many ?"], answers=["3"])
    elif family != "mllama":  # Mllama refuses image positions outright (its image is not in the stream)
        text_only = vlm.prepare(["how many ?"], answers=["3"])
        with pytest.raises(E.InputError, match="empty in every sample"):
            sweep(vlm, clean=text_only, corrupt=text_only, positions="vision", layers=[0], progress=False)
    batch = vlm.prepare("how many ?", [IMG])
    short = torch.ones(1, 3, dtype=torch.bool)
    layer = next(i for i in range(vlm.n_layers) if not vlm.layers[i].is_cross_attention)
    with pytest.raises(E.InputError, match=r"\[batch, total\]"), vlm.trace(batch):
        knockout(vlm, layer, short, short, batch=batch)
