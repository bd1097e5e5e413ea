"""Memory soak: 1,000 consecutive traces that save every layer; RSS growth is printed.

Goal: RSS after the soak within 5% of RSS after warm-up (no per-trace leak).
"""

from __future__ import annotations

import argparse
import gc
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nnsight  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import vlm_probe  # noqa: E402
from _common import machine, rss_mb  # noqa: E402
from vlm_probe.testbed.zoo import tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--traces", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("machine:", machine())
    tiny = tiny_vlm("qwen2_5_vl")
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare("how many red circles ?", images=[tiny.image()])

    def one() -> None:
        with torch.no_grad(), vlm.trace(batch):
            nnsight.save([layer.output for layer in vlm.layers])
            vlm.lm_head.output.save()

    for _ in range(50):
        one()
    gc.collect()
    start = rss_mb()
    marks = []
    for i in range(args.traces):
        one()
        if (i + 1) % (args.traces // 4) == 0:
            gc.collect()
            marks.append(rss_mb())
    growth = (marks[-1] - start) / start
    print(f"RSS after warm-up {start:.1f} MiB; after each quarter: {', '.join(f'{m:.1f}' for m in marks)} MiB")
    print(f"growth over {args.traces} traces: {100 * growth:+.2f}%  (goal < 5%)")


if __name__ == "__main__":
    main()
