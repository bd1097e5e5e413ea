"""The vision-token KV swap (the paper's main probe): vlm_probe's sweep vs one generate per layer.

For every start layer L of a 12-layer Qwen2.5-VL, 8 target/source pairs, the target image's
vision keys/values are replaced by the source image's in layers L..N-1 at prefill, then the
model answers greedily:
   engine     vlm_probe.analyses.vision_swap_sweep: one SwapKV variant per start layer, run by
              the engine (vision tower once; layers below L shared with the unswapped run; the
              swap written into a copy of the unswapped run's KV cache so only the text after
              the image is rerun, from layer L up; the decode of all start layers batched)
   published  one greedy ``generate`` per start layer with the swap applied by hooks at
              prefill (the published algorithm, with its decode-step bug fixed)
   generate   one plain greedy ``generate`` of the batch: the unit "one generate per layer"
Identical answers are checked; medians of interleaved repeats and ratios are printed.
Goal (CPU, 64-token image): engine <= 0.5 x (one generate per layer).
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import vlm_probe  # noqa: E402
from _common import interleaved, machine  # noqa: E402
from vlm_probe.analyses.generation import GreedyGenerator, decode_new, greedy_config  # noqa: E402
from vlm_probe.analyses.swap import vision_swap_sweep  # noqa: E402
from vlm_probe.interventions import vision_kv  # noqa: E402
from vlm_probe.testbed.zoo import tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()
SMALL = dict(d_model=256, n_layers=12, n_heads=8, n_kv_heads=4, d_mlp=768, vision_d=64, vision_mlp=128)


def published_swap(vlm, targets, sources, config) -> list[str]:
    """One greedy generation per start layer, the swap applied by hooks on the first forward."""
    answers = []
    kv = vision_kv(vlm, sources, range(vlm.n_layers))
    mask = targets.layout.mask("vision").to(vlm.device)
    inputs = {k: v.to(vlm.device) for k, v in targets.inputs.items() if k != "position_ids"}
    for start in range(vlm.n_layers):
        handles, fired = [], set()
        for layer in range(start, vlm.n_layers):
            for name, value in zip(("k", "v"), kv[layer]):
                def hook(mod, args, output, value=value, key=(layer, name)):
                    if key in fired:
                        return output
                    fired.add(key)
                    out = output.clone()
                    out[mask] = value
                    return out

                handles.append(getattr(vlm.layers[layer], name)._module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                ids = vlm.hf.generate(**inputs, generation_config=config)
        finally:
            for handle in handles:
                handle.remove()
        answers += decode_new(vlm, ids, targets.width)
    return answers


def engine_swap(vlm, targets, sources, config) -> list[str]:
    result = vision_swap_sweep(vlm, targets, sources, generation_config=config, progress=False)
    return result.frame.sort_values(["layer", "sample"])["answer"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--image-size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"),
                        help="image pixels (default 128 x 128: 64 image tokens; 32 48: 6)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("machine:", machine())
    tiny = tiny_vlm("qwen2_5_vl", **SMALL)
    vlm = vlm_probe.load(tiny)
    n, size = args.samples, tuple(args.image_size)
    prompts = ["how many red circles are there ?"] * n
    targets = vlm.prepare(prompts, [[tiny.image(i, size)] for i in range(n)])
    sources = vlm.prepare(prompts, [[tiny.image(100 + i, size)] for i in range(n)])
    params = sum(p.numel() for p in tiny.model.parameters())
    print(f"model: Qwen2.5-VL {params / 1e6:.1f} M parameters, {vlm.n_layers} layers, {n} pairs, sequence "
          f"{targets.width} tokens ({len(targets.layout[0].spans['vision'])} image), "
          f"{args.max_new_tokens} new tokens, mode 'from'")
    config = greedy_config(vlm, max_new_tokens=args.max_new_tokens)
    generator = GreedyGenerator(vlm, config=config)
    x, y = engine_swap(vlm, targets, sources, config), published_swap(vlm, targets, sources, config)
    print(f"{len(x)} answers, engine == published: {x == y}")
    times = interleaved({"engine": lambda: engine_swap(vlm, targets, sources, config),
                         "published": lambda: published_swap(vlm, targets, sources, config),
                         "generate": lambda: generator(targets)}, args.repeats, warmup=1)
    for key, value in times.items():
        print(f"  {key:<10} {value:8.3f} s")
    per_layer = times["engine"] / (vlm.n_layers * times["generate"])
    print(f"  engine / published = {times['engine'] / times['published']:.3f}")
    print(f"  engine per start layer / one generate = {per_layer:.3f}  (goal <= 0.5 on CPU)")


if __name__ == "__main__":
    main()
