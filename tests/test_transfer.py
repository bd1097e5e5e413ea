"""The transfer table: spliced variants score exactly like written merges loaded from disk."""

from __future__ import annotations

import copy
import json

import pandas as pd
import torch

import vlm_probe
from vlm_probe.evaluation.suite import evaluate_fine_grained
from vlm_probe.evaluation.transfer import TransferTable, transfer_table
from vlm_probe.results import Result
from vlm_probe.testbed.zoo import tiny_vlm
from vlm_probe.weights.merge import write_merge
from vlm_probe.weights.plans import thirds_plan


def _data(tmp_path, tiny):
    items = []
    for i in range(3):
        tiny.image(i).save(tmp_path / f"img{i}.png")
        items.append({"id": f"q{i}", "question": "how many red circles ?", "image": f"img{i}.png",
                      "answer": str(i), "description": "two red circles"})
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n")
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"id": f"t{i}", "question": f"what is {i} plus 1 ?",
                                                                "answer": str(i + 1)}) for i in range(3)) + "\n")
    return tmp_path / "vqa.jsonl", tmp_path / "text.jsonl"


def test_transfer_table_matches_written_merges(tmp_path) -> None:
    tiny = tiny_vlm("qwen2_5_vl", n_layers=3)
    tiny.save(tmp_path / "IN")
    rl = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in rl.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    rl.save_pretrained(tmp_path / "RL")
    vlm_probe.model.processors.save_processor(tiny.processor, tmp_path / "RL")
    vqa, text = _data(tmp_path, tiny)
    checkpoints = {"IN": tmp_path / "IN", "RL": tmp_path / "RL"}
    plans = {"IN:RL:IN": thirds_plan("IN:RL:IN"), "RL:IN:IN": thirds_plan("RL:IN:IN")}  # hosts IN and RL
    vlm = vlm_probe.load(tmp_path / "IN")
    options = dict(general=vqa, math=vqa, reasoning=text, max_new_tokens=3, batch_size=2)
    table = transfer_table(vlm, checkpoints, plans, progress=False, **options)
    assert list(dict.fromkeys(table.frame["variant"])) == ["IN", "RL", "IN:RL:IN", "RL:IN:IN"]
    hosts = dict(zip(table.frame["variant"], table.frame["host"]))
    assert hosts == {"IN": "IN", "RL": "RL", "IN:RL:IN": "IN", "RL:IN:IN": "RL"}
    merged = {name: write_merge(plans[name], checkpoints, tmp_path / name.replace(":", "-"), progress=False)
              for name in plans}
    for name, path in (("IN", tmp_path / "IN"), ("RL", tmp_path / "RL"), *merged.items()):
        expected = evaluate_fine_grained(vlm_probe.load(path), name=name, quiet=True, **options).metrics()
        got = table.frame[table.frame["variant"] == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(got[["metric", "value", "low", "high", "n"]],
                                      expected[["metric", "value", "low", "high", "n"]])
    assert table.wide().shape == (4, 3)
    table.save(tmp_path / "table")
    assert isinstance(Result.load(tmp_path / "table"), TransferTable)
    assert table.plot() is not None
