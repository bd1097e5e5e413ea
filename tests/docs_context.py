"""The context the documentation's code runs in (``tests/test_docs.py`` imports it before a page).

The pages write ``vlm_probe.load("ckpt/in")``, ``batch``, ``img``...: here those names exist,
offline and on a CPU, in seconds: tiny Qwen2.5-VL checkpoints with 28 decoder layers under the
directory names the pages use (``ckpt/base``, ``ckpt/in``, ``ckpt/rl``), images, a clean and a
corrupted input, and small data files in the harness's formats. A page adds what only it needs
in a hidden ``<!-- docs-test setup ... -->`` comment.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import nnsight  # noqa: F401  (the pages use it)
import numpy as np  # noqa: F401
import pandas as pd  # noqa: F401
import torch
import transformers

import vlm_probe
from vlm_probe.testbed.zoo import tiny_vlm

torch.set_num_threads(1)
transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()

tiny = tiny_vlm("qwen2_5_vl", n_layers=28)


def _save(path: Path, seed: int | None) -> None:
    if path.exists():
        return
    if seed is None:
        tiny.save(path)
        return
    model = copy.deepcopy(tiny.model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    model.save_pretrained(path)
    vlm_probe.model.processors.save_processor(tiny.processor, path)


for _name, _seed in (("in", None), ("rl", 1), ("base", 2)):
    _save(Path("ckpt") / _name, _seed)

img = image = img_a = image_a = tiny.image(0)
img_b = image_b = tiny.image(1)
vlm = vlm_probe.load("ckpt/in")
models = vlm_probe.load_set(IN="ckpt/in", RL="ckpt/rl")
batch = vlm.prepare(["How many red circles?"] * 2, images=[[img_a], [img_b]])
clean, corrupt = batch[0], batch[1]


def _write_data() -> None:
    Path("images").mkdir(exist_ok=True)
    vqa, text = [], []
    for i in range(4):
        tiny.image(i).save(f"images/{i}.png")
        vqa.append({"id": f"q{i}", "question": "how many red circles ?", "image": f"../images/{i}.png",
                    "answer": str(i), "description": "two red circles", "category": "count"})
        text.append({"id": f"t{i}", "question": f"what is {i} plus 1 ?", "answer": str(i + 1)})
    for folder, names in ((Path("data"), ("general.jsonl", "math.jsonl", "text.jsonl")),
                          (Path("."), ("general.jsonl", "math_vqa.jsonl", "math_text.jsonl"))):
        folder.mkdir(exist_ok=True)
        prefix = "" if folder == Path("data") else "images/"
        for name in names:
            rows = text if "text" in name else [{**r, "image": r["image"] if folder == Path("data")
                                                 else f"{prefix}{r['image'].rsplit('/', 1)[1]}"} for r in vqa]
            (folder / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


_write_data()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
