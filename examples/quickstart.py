"""Quickstart: trace a VLM, read the vision tokens, patch them from another image.

Runs offline on a tiny random Qwen2.5-VL; pass a checkpoint path to use a real model:
    python examples/quickstart.py [path/or/hub-id]
"""

import sys

import nnsight
import torch

import vlm_probe
from vlm_probe.testbed.zoo import tiny_vlm

tiny = tiny_vlm("qwen2_5_vl")
vlm = vlm_probe.load(sys.argv[1]) if len(sys.argv) > 1 else vlm_probe.load(tiny)
print(vlm)

# two images, one question: prepared together so their token layouts line up
batch = vlm.prepare(["How many red circles?"] * 2, images=[[tiny.image(1)], [tiny.image(2)]])
layout = batch.layout
print(layout)
print("vision positions:", layout.vision.tolist())

# read every layer's residual stream at the vision tokens, in one forward
with vlm.trace(batch):
    vision_states = nnsight.save([layer.output[:, layout.vision] for layer in vlm.layers])
    logits = vlm.lm_head.output.save()
print("layer-0 vision states:", tuple(vision_states[0].shape))

# patch image 1's vision tokens into image 2's run at layer 1: clean and patched in one trace
clean, corrupt = batch[0], batch[1]
with vlm.trace() as tracer:
    barrier = tracer.barrier(2)  # the patched invoke waits until the source value exists
    with tracer.invoke(clean):
        source = vlm.layers[1].output[:, layout.vision]
        barrier()
    with tracer.invoke(corrupt):
        barrier()
        vlm.layers[1].output[:, layout.vision] = source
        patched = vlm.lm_head.output[:, -1].save()
shift = (patched[0] - logits[1, -1]).abs().max().item()
towards = torch.nn.functional.cosine_similarity(patched[0], logits[0, -1], dim=0).item()
print(f"patching moved the last-token logits by {shift:.3f} (cosine to the clean run: {towards:.3f})")
