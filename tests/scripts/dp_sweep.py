"""Run by tests/test_sweeps.py under `accelerate launch --num_processes 2`."""

import os
import sys

import torch
import transformers

import vlm_probe
from vlm_probe.analyses import metrics as M
from vlm_probe.analyses import sweep
from vlm_probe.analyses.parallel import world
from vlm_probe.testbed.zoo import tiny_vlm

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
tiny = tiny_vlm("qwen2_5_vl")
vlm = vlm_probe.load(tiny)
batch = vlm.prepare(["how many red circles ?"] * 4, [[tiny.image(i)] for i in range(4)])
result = sweep(vlm, batch[:2], batch[2:], site=["layer_out", "mlp_out"], positions=["vision", "last"],
               metric=M.kl_to_clean(), progress=False)
print(f"rank={os.environ.get('RANK')} world={world()} rows={len(result.frame)}")
if world()[0] == 0:
    result.frame.to_parquet(sys.argv[1])
