"""Attribution patching (AtP / AtP*) against exact patching: accuracy and cost, in one run.

Accuracy, on every zoo family (random tiny models) and on the testbed when a build is cached
(RL with the source image patched into the target image's run on swap pairs, and RL patched
into IN on v2r items), for the cells site x layer x positions (and one cell per vision token):
  spearman      rank correlation of the estimated and exact effects (mean over samples per cell)
  per-layer     the same within each decoder layer (its sites x positions cells): median and min
  top-10        share of the exact top-10 cells (mean |effect|) among the estimate's top 10
for plain AtP (gradient x difference), AtP* (attention recomputed for query/key sites) and,
on the testbed, AtP* ranked by the GradDrop score.

Cost, on a 28-layer model: forward-equivalents (FE) of the exact sweep counted as one forward
per cell plus the clean and unpatched runs, and of attribution as two forwards plus one
backward (counted as two forwards); then measured: each method's median wall time (interleaved
repeats) over one plain forward of the same batch, and the ratio exact / attribution.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

import vlm_probe  # noqa: E402
from _common import interleaved, machine  # noqa: E402
from vlm_probe.analyses import attribution_sweep, cross_attribution, cross_patch, sweep  # noqa: E402
from vlm_probe.analyses import metrics as M  # noqa: E402
from vlm_probe.testbed.zoo import FAMILIES, tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()
SITES = ["layer_out", "attn_out", "mlp_out", "q", "k"]
POSITIONS = ["vision", "question", "last"]
KEYS = ["site", "layer", "positions"]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return float(np.corrcoef(pd.Series(x).rank(), pd.Series(y).rank())[0, 1])


def compare(estimated: pd.DataFrame, exact: pd.DataFrame, score: str = "estimate") -> dict[str, float]:
    """Rank correlation (all cells, per layer) and top-10 recovery of an estimate against exact patching."""
    est = estimated.assign(effect=estimated["estimate"], magnitude=estimated[score].abs())
    ex = exact.assign(effect=exact["value"] - exact["corrupt"], magnitude=(exact["value"] - exact["corrupt"]).abs())
    a = est.groupby(KEYS)[["effect", "magnitude"]].mean()
    b = ex.groupby(KEYS)[["effect", "magnitude"]].mean().loc[a.index]
    per_layer = [spearman(a.loc[idx, "effect"].to_numpy(), b.loc[idx, "effect"].to_numpy())
                 for _, idx in a.groupby(level="layer").groups.items()]
    per_layer = [r for r in per_layer if np.isfinite(r)]
    top_a = set(a["magnitude"].nlargest(10).index)
    top_b = set(b["magnitude"].nlargest(10).index)
    return {"cells": len(a), "spearman": spearman(a["effect"].to_numpy(), b["effect"].to_numpy()),
            "layer_median": statistics.median(per_layer) if per_layer else float("nan"),
            "layer_min": min(per_layer) if per_layer else float("nan"),
            "top10": len(top_a & top_b) / min(10, len(a))}


def top_tokens(vlm, batch) -> torch.Tensor:
    rows = torch.arange(len(batch))
    last = torch.tensor([row.spans["last_prompt"][0] for row in batch.layout])
    with torch.no_grad():
        return vlm.hf(**batch.inputs).logits[rows, last].float()


def contrast_metric(clean_logits: torch.Tensor, corrupt_logits: torch.Tensor) -> M.LogitDiff:
    """logit(clean's top token) - logit(corrupt's top token); the clean's second token where they agree."""
    target = clean_logits.argmax(-1)
    foil = corrupt_logits.argmax(-1)
    second = clean_logits.topk(2, -1).indices[:, 1]
    foil = torch.where(foil == target, second, foil)
    return M.LogitDiff(target, foil)


def report(name: str, rows: dict[str, dict[str, float]]) -> None:
    for method, r in rows.items():
        print(f"  {name:34s} {method:14s} cells {r['cells']:4d}  spearman {r['spearman']:6.3f}  per-layer median "
              f"{r['layer_median']:6.3f} min {r['layer_min']:6.3f}  top-10 {r['top10']:.0%}", flush=True)


def accuracy(vlm, clean, corrupt, metric, sites, positions, graddrop=False, cross=None):
    """Exact and estimated effects; ``cross=(donor, names)`` for cross-checkpoint patching."""
    kwargs = dict(site=sites, positions=positions, metric=metric, progress=False)
    if cross is None:
        exact = sweep(vlm, clean, corrupt, **kwargs).frame
        fixed = attribution_sweep(vlm, clean, corrupt, graddrop=graddrop, **kwargs).frame
        plain = attribution_sweep(vlm, clean, corrupt, corrections=(), **kwargs).frame
    else:
        donor, names = cross
        exact = cross_patch(vlm, donor, clean, names=names, **kwargs).frame
        fixed = cross_attribution(vlm, donor, clean, names=names, graddrop=graddrop, **kwargs).frame
        plain = cross_attribution(vlm, donor, clean, names=names, corrections=(), **kwargs).frame
    rows = {"AtP": compare(plain, exact), "AtP*": compare(fixed, exact)}
    if graddrop:
        rows["AtP*+GradDrop"] = compare(fixed, exact, score="graddrop")
    return rows


def families(n: int) -> None:
    print("\n== zoo families (random tiny models; clean and corrupt differ in the image)")
    for family in FAMILIES:
        tiny = tiny_vlm(family)
        vlm = vlm_probe.load(tiny)
        batch = vlm.prepare(["how many red circles ?"] * 2 * n, [[tiny.image(i)] for i in range(2 * n)])
        clean, corrupt = batch[:n], batch[n:]
        metric = contrast_metric(top_tokens(vlm, clean), top_tokens(vlm, corrupt))
        positions = POSITIONS if vlm.image_in_residual else ["question", "last"]
        sites = SITES if family != "mllama" else ["layer_out", "attn_out", "mlp_out", "q"]  # cross-attention keys
        report(family, accuracy(vlm, clean, corrupt, metric, sites, positions))


def find_testbed(path: str | None) -> Path | None:
    if path:
        return Path(path)
    from vlm_probe.testbed.build import cache_root

    builds = [p for p in (cache_root() / "testbed").glob("qwen2_5_vl-*") if "reduced" not in p.name
              and (p / "rl").is_dir() and (p / "in").is_dir() and (p / "data").is_dir()]
    return max(builds, key=lambda p: p.stat().st_mtime) if builds else None


def testbed(path: Path, n: int, graddrop: bool) -> None:
    print(f"\n== testbed {path.name}")
    data = path / "data"
    swap = [json.loads(line) for line in (data / "swap.jsonl").read_text().splitlines()][:n]
    rl = vlm_probe.load(path / "rl")
    images = lambda key, items: [[Image.open(data / item[key]).convert("RGB")] for item in items]  # noqa: E731
    prompts = [item["prompt"] for item in swap]
    clean, corrupt = vlm_probe.align(rl.prepare(prompts, images("source_image", swap)),
                                     rl.prepare(prompts, images("target_image", swap)))
    metric = contrast_metric(top_tokens(rl, clean), top_tokens(rl, corrupt))
    report("RL, source image into target", accuracy(rl, clean, corrupt, metric, SITES, POSITIONS, graddrop))
    report("RL, per vision token", accuracy(rl, clean, corrupt, metric, ["layer_out", "attn_out", "k"],
                                             "each:vision", graddrop))
    v2r = [json.loads(line) for line in (data / "v2r.jsonl").read_text().splitlines()][:n]
    inn = vlm_probe.load(path / "in")
    batch = inn.prepare([item["question"] for item in v2r], [[Image.open(data / item["image"]).convert("RGB")]
                                                              for item in v2r])
    metric = contrast_metric(top_tokens(rl, batch), top_tokens(inn, batch))
    report("RL into IN (v2r items)", accuracy(inn, batch, batch, metric, SITES, POSITIONS + ["all"], graddrop,
                                              cross=(rl, ("IN", "RL"))))


def cost(layers: int, n: int, image: int, repeats: int) -> None:
    print(f"\n== cost at {layers} layers (tiny width, {n} samples, {image}x{image} images)")
    tiny = tiny_vlm("qwen2_5_vl", n_layers=layers)
    vlm = vlm_probe.load(tiny)
    batch = vlm.prepare(["how many red circles ?"] * 2 * n, [[tiny.image(i, (image, image))] for i in range(2 * n)])
    clean, corrupt = batch[:n], batch[n:]
    metric = contrast_metric(top_tokens(vlm, clean), top_tokens(vlm, corrupt))
    vision = int(corrupt.layout.mask("vision")[0].sum())
    configs = {"layer_out x vision": (["layer_out"], "vision"),
               "3 sites x 3 positions": (["layer_out", "attn_out", "mlp_out"], POSITIONS),
               f"layer_out x each vision token ({vision})": (["layer_out"], "each:vision")}

    def forward() -> None:
        with torch.no_grad():
            vlm.hf(**corrupt.inputs)

    forward()
    for name, (sites, positions) in configs.items():
        kwargs = dict(site=sites, positions=positions, metric=metric, progress=False, max_rows=64 * n)
        t = interleaved({"forward": forward, "exact": lambda: sweep(vlm, clean, corrupt, **kwargs),
                         "attribution": lambda: attribution_sweep(vlm, clean, corrupt, **kwargs)}, repeats, warmup=1)
        cells = len(attribution_sweep(vlm, clean, corrupt, **kwargs).frame) // n
        exact_fe, attr_fe = cells + 2, 2 + 2
        print(f"  {name:34s} cells {cells:4d}  FE exact {exact_fe:5d} / attribution {attr_fe} = "
              f"{exact_fe / attr_fe:5.1f}x  |  measured: exact {t['exact'] / t['forward']:6.1f} FE, attribution "
              f"{t['attribution'] / t['forward']:5.1f} FE, exact / attribution = {t['exact'] / t['attribution']:5.1f}x",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--testbed", help="a testbed build directory (default: the newest full build in the cache)")
    parser.add_argument("--testbed-samples", type=int, default=16)
    parser.add_argument("--graddrop", action="store_true", help="also rank by GradDrop on the testbed")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--image-size", type=int, default=64, help="image pixels (64: 16 image tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["families", "testbed", "cost"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("machine:", machine())
    if "families" not in args.skip:
        families(args.samples)
    if "testbed" not in args.skip:
        path = find_testbed(args.testbed)
        if path is None:
            print("\n== testbed: no build in the cache (build one with vlm_probe.testbed.build_testbed())")
        else:
            testbed(path, args.testbed_samples, args.graddrop)
    if "cost" not in args.skip:
        cost(args.layers, args.samples, args.image_size, args.repeats)


if __name__ == "__main__":
    main()
