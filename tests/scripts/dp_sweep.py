"""Run by tests/test_sweeps.py under `accelerate launch --num_processes 2`: sweeps with
per-sample state (logit_diff's targets, per-sample graders) on 3 samples split 2 + 1."""

import os
import sys

import pandas as pd
import torch
import transformers

import vlm_probe
from vlm_probe.analyses import layer_ablation_sweep, sweep
from vlm_probe.analyses.parallel import world
from vlm_probe.testbed.zoo import tiny_vlm

from dp_common import graders, metric, prompts  # noqa: E402

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()
tiny = tiny_vlm("qwen2_5_vl")
vlm = vlm_probe.load(tiny)
clean, corrupt = prompts(vlm, tiny)
patching = sweep(vlm, clean, corrupt, site=["layer_out", "mlp_out"], positions=["vision", "last"],
                 metric=metric(vlm), progress=False, parallel="accelerate")
ablation = layer_ablation_sweep(vlm, corrupt, grader=graders(), max_new_tokens=3, progress=False,
                                parallel="accelerate")
print(f"rank={os.environ.get('RANK')} world={world('accelerate')} rows={len(patching.frame)}")
if world("accelerate")[0] == 0:
    pd.to_pickle({"patching": patching.frame, "ablation": ablation.frame}, sys.argv[1])
