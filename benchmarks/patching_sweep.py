"""Activation patching: vlm_probe's sweep (the variant engine) vs a naive loop vs the published shape.

layer_out x {vision, question, last} x every layer, 8 samples, KL to the clean run:
   engine     vlm_probe.analyses.sweep: one Patch per cell, run by the engine (cells packed
              into batched forwards, vision tower once, layers below a chunk's shallowest cell
              replayed from the unpatched run, chunks editing only text after the image rerun
              just the columns from their first edit on over the unpatched run's KV cache)
   naive      one forward per cell (all samples in it) with raw torch forward hooks
   per-sample one forward per cell and sample with raw torch hooks (the published loops' shape)
All give identical numbers; medians of interleaved repeats and ratios are printed, with the
exact-recomputation floor: the share of the naive loop's layer-token work that any exact
method must redo (every position from the first patched one on, from the patched layer up,
plus the clean and unpatched runs). Goal: engine / naive <= 0.36 (this sweep's ratio before the
engine), as close to the floor as the fixed cost per forward allows. ``--image-size 128 128``
gives a real VLM's token mix (most of the sequence is image tokens) instead of the default
6-token image. The vision-token swap has its own benchmark: ``vision_swap.py``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import vlm_probe  # noqa: E402
from _common import interleaved, machine  # noqa: E402
from vlm_probe.analyses import metrics as M  # noqa: E402
from vlm_probe.analyses import sweep  # noqa: E402
from vlm_probe.testbed.zoo import tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()
SMALL = dict(d_model=256, n_layers=12, n_heads=8, n_kv_heads=4, d_mlp=768, vision_d=64, vision_mlp=128)
POSITIONS = ["vision", "question", "last"]


def per_sample_patching(vlm, clean, corrupt) -> list[float]:
    """One forward per (layer, positions, sample) cell with raw torch hooks."""
    out: list[list[float]] = []
    for i in range(len(clean)):
        out.append(naive_patching(vlm, clean[i], corrupt[i]))
    n_cells = len(out[0])
    return [out[i][c] for c in range(n_cells) for i in range(len(clean))]


def naive_patching(vlm, clean, corrupt) -> list[float]:
    """One forward per (layer, positions) cell, patched with raw torch hooks."""
    clean_inputs = {k: v.to(vlm.device) for k, v in clean.inputs.items()}
    corrupt_inputs = {k: v.to(vlm.device) for k, v in corrupt.inputs.items()}
    with torch.no_grad():
        hidden = vlm.hf(**clean_inputs, output_hidden_states=True).hidden_states
        clean_logits = vlm.hf(**clean_inputs).logits[:, -1]
    values = []
    for layer in range(vlm.n_layers):
        module = vlm.layers[layer].envoy._module
        for positions in POSITIONS:
            mask = corrupt.layout.mask(positions).to(vlm.device)
            source = hidden[layer + 1]

            def hook(mod, args, output, mask=mask, source=source):
                out = output.clone()
                out[mask] = source[mask]
                return out

            handle = module.register_forward_hook(hook)
            try:
                with torch.no_grad():
                    logits = vlm.hf(**corrupt_inputs).logits[:, -1]
            finally:
                handle.remove()
            values += M.kl(clean_logits, logits).tolist()
    return values


def batched_patching(vlm, clean, corrupt) -> list[float]:
    result = sweep(vlm, clean, corrupt, positions=POSITIONS, metric=M.kl_to_clean(), progress=False)
    frame = result.frame.sort_values(["layer", "cell", "sample"])
    return frame["value"].tolist()


def floor_ratio(vlm, batch) -> float:
    """Layer-token work an exact sweep must redo, over the naive loop's (cells x full forwards)."""
    n_layers, width = vlm.n_layers, batch.width
    redo = 0
    for layer in range(n_layers):
        for positions in POSITIONS:
            first = int(batch.layout.mask(positions).any(0).nonzero()[0])
            after_image = not bool(batch.layout.mask("vision")[:, first:].any())
            start = first if after_image else 0
            redo += (width - start) * (n_layers - layer)
    naive = n_layers * len(POSITIONS) * width * n_layers
    return (redo + 2 * width * n_layers) / naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=(32, 48), metavar=("H", "W"),
                        help="image pixels (default 32 x 48: 6 image tokens; 128 128: 64)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("machine:", machine())
    tiny = tiny_vlm("qwen2_5_vl", **SMALL)
    vlm = vlm_probe.load(tiny)
    n = args.samples
    prompts = ["how many red circles are there ?"] * n
    size = tuple(args.image_size)
    clean = vlm.prepare(prompts, [[tiny.image(i, size)] for i in range(n)])
    corrupt = vlm.prepare(prompts, [[tiny.image(100 + i, size)] for i in range(n)])
    params = sum(p.numel() for p in tiny.model.parameters())
    spans = {g: len(clean.layout[0].spans[g]) for g in ("vision", "question")}
    print(f"model: Qwen2.5-VL {params / 1e6:.1f} M parameters, {vlm.n_layers} layers, {n} samples, "
          f"sequence {clean.width} tokens ({spans['vision']} image, {spans['question']} question)")

    a, b = batched_patching(vlm, clean, corrupt), naive_patching(vlm, clean, corrupt)
    c = per_sample_patching(vlm, clean, corrupt)
    worst = max(max(abs(x - y) for x, y in zip(a, b)), max(abs(x - y) for x, y in zip(a, c)))
    print(f"\npatching sweep: {len(a)} values, max |engine - naive| = {worst:.2e}")
    times = interleaved({"engine": lambda: batched_patching(vlm, clean, corrupt),
                         "naive": lambda: naive_patching(vlm, clean, corrupt),
                         "per-sample": lambda: per_sample_patching(vlm, clean, corrupt)}, args.repeats, warmup=1)
    for key, value in times.items():
        print(f"  {key:<10} {value:8.3f} s")
    print(f"  engine / naive = {times['engine'] / times['naive']:.3f}  (goal <= 0.36; exact-recomputation floor "
          f"{floor_ratio(vlm, corrupt):.3f})")
    print(f"  engine / per-sample = {times['engine'] / times['per-sample']:.3f}")


if __name__ == "__main__":
    main()
