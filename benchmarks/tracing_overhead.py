"""Tracing overhead: plain forward vs nnsight traces vs raw torch forward hooks.

Compares, on a tiny (~0.3 M) and a small (~25 M parameter) Qwen2.5-VL:
  plain        the HF forward, no tracing
  trace_noop   a vlm_probe trace that reads nothing
  trace_all    a trace saving every decoder layer's output
  hooks_all    raw torch forward hooks saving every decoder layer's output (the baseline)
Variants run interleaved; medians of many calls are printed with ratios.
Goal: trace_all / hooks_all <= 1.05 on the small model.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nnsight  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import vlm_probe  # noqa: E402
from _common import interleaved, machine  # noqa: E402
from vlm_probe.testbed.zoo import tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()

SIZES = {
    "tiny": {},
    "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_mlp=1536, vision_d=128, vision_mlp=256),
}


def bench(name: str, sizes: dict, repeats: int) -> dict[str, float]:
    tiny = tiny_vlm("qwen2_5_vl", **sizes)
    vlm = vlm_probe.load(tiny)
    n_params = sum(p.numel() for p in tiny.model.parameters())
    batch = vlm.prepare("how many red circles are there ?", images=[tiny.image()])
    medians = interleaved(variants(vlm, batch), repeats)
    print(f"\n{name}: {n_params / 1e6:.2f} M parameters, sequence {batch.width} tokens")
    for key, value in medians.items():
        print(f"  {key:<11} {value * 1e3:8.2f} ms   {value / medians['plain']:.3f}x plain")
    ratio = medians["trace_all"] / medians["hooks_all"]
    print(f"  trace_all / hooks_all = {ratio:.3f}  (goal <= 1.05 on the small model)")
    return medians


def variants(vlm, batch) -> dict[str, Callable[[], None]]:
    """The four compared calls on ``batch`` (inputs moved to the model's device once)."""
    inputs = {k: v.to(vlm.device) for k, v in batch.inputs.items()}
    model = vlm.hf

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    def trace_noop() -> None:
        with torch.no_grad(), vlm.trace(batch):
            vlm.lm_head.output.save()

    def trace_all() -> None:
        with torch.no_grad(), vlm.trace(batch):
            nnsight.save([layer.output for layer in vlm.layers])
            vlm.lm_head.output.save()

    layers = [layer.envoy._module for layer in vlm.layers]

    def hooks_all() -> None:
        saved: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda mod, args, out: saved.append(out)) for m in layers]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()

    return {"plain": plain, "trace_noop": trace_noop, "trace_all": trace_all, "hooks_all": hooks_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("machine:", machine())
    for name, sizes in SIZES.items():
        bench(name, sizes, args.repeats)


if __name__ == "__main__":
    main()
