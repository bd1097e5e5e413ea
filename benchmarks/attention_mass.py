"""Attention mass on a long sequence: chunked recomputation vs switching the model to eager.

  chunked  vlm_probe.analyses.attention_mass with the model on sdpa (rows recomputed from the
           layer's queries and keys, chunk by chunk)
  eager    the model loaded with attn_implementation="eager", full attention weights of every
           layer read from the attention modules (the usual approach; ``eager_mass`` with
           ``save_weights=False`` reduces each layer inside the trace, as gpu_check.py does at 8k)
Each variant runs in its own process (peak RSS is per process); the sequence is >= 2,000
tokens (a large image plus a long prompt). Medians of repeated runs and ratios are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZES = dict(d_model=256, n_layers=8, n_heads=8, n_kv_heads=4, d_mlp=512, vision_d=64, vision_mlp=128)


def _setup():
    import torch
    import transformers

    import vlm_probe
    from vlm_probe.testbed.zoo import tiny_vlm

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    tiny = tiny_vlm("qwen2_5_vl", **SIZES)
    image_processor = tiny.processor.image_processor  # allow large images (the zoo caps them)
    image_processor.max_pixels = image_processor.size["longest_edge"] = 16 * 16 * 4096
    return tiny, vlm_probe


def chunked_mass(vlm, batch) -> list[float]:
    """Mean attention mass from question to vision tokens per layer, rows recomputed chunk by chunk."""
    from vlm_probe.analyses.attention_mass import attention_mass

    frame = attention_mass(vlm, batch, queries="question", keys="vision", chunk=64, progress=False).frame
    return frame.groupby("layer")["mass"].mean().tolist()


def eager_mass(vlm, batch, save_weights: bool = True) -> list[float]:
    """The same from the attention weights of a model on eager attention: every layer's
    ``[batch, heads, seq, seq]`` weights saved (``save_weights``, the usual approach, the
    figures on the benchmarks page) or each reduced inside the trace (one layer's alive at a time)."""
    import nnsight
    import torch

    vision = batch.layout.mask("vision").float().to(vlm.device)
    question = batch.layout.mask("question").float().to(vlm.device)

    def reduce(w):  # [B, H, T, T] -> [B, H]: mass on vision keys summed over question queries
        return ((w * vision[:, None, None, :]).sum(-1) * question[:, None, :]).sum(-1)

    with torch.no_grad(), vlm.trace(batch):
        out = nnsight.save([layer.attn.output[1] if save_weights else reduce(layer.attn.output[1])
                            for layer in vlm.layers])
    per_layer = [reduce(w) for w in out] if save_weights else out
    return [float((m.float() / question.sum(-1, keepdim=True)).mean()) for m in per_layer]


def run_variant(variant: str, repeats: int) -> dict:
    import torch

    tiny, vlm_probe = _setup()
    vlm = vlm_probe.load(tiny, attn_implementation="sdpa" if variant == "chunked" else "eager")
    prompt = " ".join(["how many red circles are there in the picture ?"] * 40)
    image = tiny.image(0, size=(16 * 40, 16 * 46))  # 40 x 46 = 1,840 vision tokens
    batch = vlm.prepare(prompt, images=[image])
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = (chunked_mass if variant == "chunked" else eager_mass)(vlm, batch)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "tokens": batch.width, "median_s": statistics.median(times),
            "peak_rss_mb": peak / 1024, "extra_rss_mb": (peak - base_rss) / 1024, "mass": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.repeats)))
        return
    import torch
    from _common import machine

    torch.set_num_threads(1)
    print("machine:", machine())
    out = {}
    for variant in ("chunked", "eager"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=True)
        out[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    c, e = out["chunked"], out["eager"]
    worst = max(abs(a - b) for a, b in zip(c["mass"], e["mass"]))
    print(f"sequence: {c['tokens']} tokens; Qwen2.5-VL {SIZES['n_layers']} layers, d_model {SIZES['d_model']}")
    print(f"max |chunked - eager| of the per-layer mass: {worst:.2e}")
    for v in (c, e):
        print(f"  {v['variant']:<8} {v['median_s']:7.2f} s   peak RSS {v['peak_rss_mb']:8.1f} MiB "
              f"(+{v['extra_rss_mb']:.1f} MiB over the loaded model)")
    print(f"  chunked / eager: time {c['median_s'] / e['median_s']:.2f}x, "
          f"extra memory {c['extra_rss_mb'] / max(e['extra_rss_mb'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
