"""Exact spectra of weight deltas on a generated bf16 trio: vlm_probe vs the published diversity script.

The trio is the one of ``weight_deltas.py`` (a real Qwen2.5-VL config: text 896 x 16 layers,
vocabulary 151,936, a 4-block 1280-wide vision tower; 3 x 1.24 GB of bf16 shards). Variants, each
in a fresh subprocess with one torch thread, interleaved, hot page cache, median of N:

  published   the published parameter-diversity analysis, reimplemented here (the repository holds
              no copy of it): three full state dicts in memory, deltas in fp16, then per matrix
              (tensors of 3+ dims as [dim 0, rest]) and step a full ``torch.linalg.svd`` in float32
              (``full_matrices=False``) and spectral norm, stable rank ``||D||_F^2 / s_1^2``, effective
              rank ``exp(entropy(s / sum s))`` and the top-50 singular values.
  exact       ``compare_weights(svd=SVDConfig(mode="exact", vectors=False))``: every singular value from
              float64 Gram eigenvalues, streamed; plus everything else compare_weights measures
              (norms, energies, cosines, sign agreement, effective rank of s^2, top-k energy).
  exact_vectors  the default (``svd="auto"``): the same and the top-50 singular vectors of both steps
              for the subspace overlaps (an ``eigh`` instead of ``eigvalsh``; not part of "equal metrics").

It prints each variant's wall and CPU time (one thread: CPU time is the steadier figure on a
shared machine) and peak RSS, the ratio published / exact (goal >= 10x), and the
largest absolute and relative differences of the four metrics between the two, matrix by matrix
(the published fp16 subtraction and float32 SVD against float32 deltas and float64 Grams).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP_K = 50


def published(paths: dict[str, str], include: str | None = None) -> dict[str, dict]:
    """The published script's approach; metrics per ``stored name|step`` (``include``: only the
    stored names this regular expression finds)."""
    import torch
    from _common import full_state_dict

    models = [full_state_dict(path) for path in paths.values()]
    names = list(paths)
    out = {}
    for key in models[0]:
        if models[0][key].ndim < 2 or (include is not None and not re.search(include, key)):
            continue
        for (i, j) in ((0, 1), (1, 2)):
            delta = models[j][key].half() - models[i][key].half()
            matrix = delta.float().reshape(delta.shape[0], -1)
            _, s, _ = torch.linalg.svd(matrix, full_matrices=False)
            frob_sq = float(torch.linalg.norm(matrix) ** 2)
            p = s / s.sum()
            p = p[p > 0]
            out[f"{key}|{names[i]}->{names[j]}"] = {
                "spectral_norm": float(s[0]),
                "stable_rank": frob_sq / float(s[0]) ** 2,
                "erank": float(torch.exp(-(p * torch.log(p)).sum())),
                "top": s[:TOP_K].tolist(),
            }
    return out


def ours(paths: dict[str, str], vectors: bool, include: str | None = None) -> dict[str, dict]:
    from vlm_probe.weights import SVDConfig, compare_weights, open_checkpoint

    result = compare_weights(paths, svd=SVDConfig(mode="exact", top_k=TOP_K, vectors=vectors), include=include,
                             quiet=True)
    stored = {e.name: e.stored_name for e in open_checkpoint(next(iter(paths.values()))).tensors.values()}
    frame = result.frame[result.frame["svd_mode"] == "exact"]
    return {
        f"{stored[row.tensor]}|{row.step}": {
            "spectral_norm": row.spectral_norm,
            "stable_rank": row.stable_rank,
            "erank": row.erank_s,
            "top": [v * row.spectral_norm for v in row.spectrum],
            "bound": row.svd_error_bound,
        }
        for row in frame.itertuples()
    }


def run_variant(variant: str, paths: dict[str, str], out: str) -> dict:
    import torch

    torch.set_num_threads(1)
    if variant == "published":
        from safetensors.torch import load_file  # noqa: F401
    else:
        import vlm_probe.weights  # noqa: F401
    start, cpu = time.perf_counter(), time.process_time()
    metrics = published(paths) if variant == "published" else ours(paths, vectors=variant == "exact_vectors")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    Path(out).write_text(json.dumps(metrics))
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM"))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": peak, "matrices": len(metrics)}


def child(variant: str, paths: dict[str, str], out: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--paths", json.dumps(paths), "--metrics", str(out)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(a: dict[str, dict], b: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Largest absolute and relative difference per metric over the matrices both hold."""
    out = {}
    for metric in ("spectral_norm", "stable_rank", "erank", "top"):
        worst_abs = worst_rel = 0.0
        for key in a.keys() & b.keys():
            x, y = a[key][metric], b[key][metric]
            pairs = zip(x, y) if metric == "top" else [(x, y)]
            for u, v in pairs:
                worst_abs = max(worst_abs, abs(u - v))
                worst_rel = max(worst_rel, abs(u - v) / max(abs(v), 1e-300))
        out[metric] = (worst_abs, worst_rel)
    return out


def float64_truth(paths: dict[str, str], keys: set[str]) -> dict[str, dict]:
    """The four metrics of the exact deltas (float64 subtraction of the stored values, float64 SVD)."""
    import torch
    from safetensors import safe_open

    def tensor(path: str, name: str) -> torch.Tensor:
        index = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(Path(path) / index[name], framework="pt") as f:
            return f.get_tensor(name)

    out = {}
    for key in sorted(keys):
        name, step = key.split("|")
        a, b = step.split("->")
        wa, wb = tensor(paths[a], name), tensor(paths[b], name)
        d = (wb.double() - wa.double()).reshape(wa.shape[0], -1)
        s = torch.linalg.svdvals(d)
        p = s / s.sum()
        p = p[p > 0]
        out[key] = {"spectral_norm": float(s[0]), "stable_rank": float((d**2).sum()) / float(s[0]) ** 2,
                    "erank": float(torch.exp(-(p * torch.log(p)).sum())), "top": s[:TOP_K].tolist()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", help="where to write the trio (kept; reused if already there). Default: a "
                        "temporary directory, removed after")
    parser.add_argument("--no-vectors-variant", action="store_true", help="skip exact_vectors")
    parser.add_argument("--oracle-max-side", type=int, default=128, help="compare both with a float64 SVD of the "
                        "exact delta on the matrices whose smaller side is at most this, and on the embedding and "
                        "lm_head (the longest sums); 0: none")
    parser.add_argument("--small", action="store_true", help="a tiny trio of the same layout (seconds): checks "
                        "the harness, times nothing worth reporting")
    parser.add_argument("--child")
    parser.add_argument("--paths")
    parser.add_argument("--metrics")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, json.loads(args.paths), args.metrics)))
        return

    sys.path.insert(0, str(HERE))
    from _common import machine
    import weight_deltas
    from weight_deltas import generate, warm_cache

    if args.small:
        weight_deltas.TEXT.update(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=500)
        weight_deltas.VISION.update(hidden=32, depth=2, intermediate=48, out=64, merge=4)
        args.oracle_max_side = 10**9

    print("machine:", machine(), "(each variant runs in a subprocess with 1 torch thread)")
    print("load average:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vlm_probe_spectra_"))
    scratch = Path(tempfile.mkdtemp(prefix="vlm_probe_spectra_metrics_"))
    try:
        if not args.small and all((root / name / "model.safetensors.index.json").is_file()
                                  for name in ("Base", "IN", "RL")):
            paths = {name: str(root / name) for name in ("Base", "IN", "RL")}
            print(f"reusing the trio in {root}")
        else:
            print(f"generating the trio in {root} ...", flush=True)
            paths = {k: str(v) for k, v in generate(root).items()}
        variants = ["published", "exact"] + ([] if args.no_vectors_variant else ["exact_vectors"])
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for variant in variants:
                warm_cache(paths)
                results[variant].append(child(variant, paths, scratch / f"{variant}.json"))
                r = results[variant][-1]
                print(f"  {variant}: {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} CPU-s "
                      f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        med = {v: statistics.median(r["seconds"] for r in results[v]) for v in variants}
        cpu = {v: statistics.median(r["cpu_seconds"] for r in results[v]) for v in variants}
        print(f"\n{'variant':14s} {'matrix-steps':>12s} {'median s':>9s} {'median CPU-s':>13s} {'all runs s':>20s} "
              f"{'peak RSS MB':>12s}")
        for v in variants:
            runs = ", ".join(f"{r['seconds']:.1f}" for r in results[v])
            print(f"{v:14s} {results[v][0]['matrices']:12d} {med[v]:9.1f} {cpu[v]:13.1f} {runs:>20s} "
                  f"{max(r['peak_mb'] for r in results[v]):12.0f}")
        ratios = [p["seconds"] / e["seconds"] for p, e in zip(results["published"], results["exact"])]
        print(f"\npublished / exact = {med['published'] / med['exact']:.2f}x wall (medians; per repeat "
              f"{', '.join(f'{r:.2f}' for r in ratios)}), {cpu['published'] / cpu['exact']:.2f}x CPU time; goal >= 10x")
        if "exact_vectors" in med:
            print(f"published / exact_vectors = {med['published'] / med['exact_vectors']:.2f}x wall, "
                  f"{cpu['published'] / cpu['exact_vectors']:.2f}x CPU time")
        pub = json.loads((scratch / "published.json").read_text())
        mine = json.loads((scratch / "exact.json").read_text())
        print(f"\nequal metrics: {len(pub.keys() & mine.keys())} matrix-steps in both "
              f"(published only: {len(pub.keys() - mine.keys())}, exact only: {len(mine.keys() - pub.keys())})")
        for metric, (worst_abs, worst_rel) in differences(mine, pub).items():
            print(f"  {metric:14s} max |exact - published| = {worst_abs:.3g}   max relative = {worst_rel:.3g}")
        if args.oracle_max_side:
            from weight_deltas import shapes

            side = {k: min(v[0], math.prod(v[1:])) for k, v in shapes().items() if len(v) >= 2}
            longest = {"model.embed_tokens.weight", "lm_head.weight"}
            keys = {k for k in pub.keys() & mine.keys()
                    if side[k.split("|")[0]] <= args.oracle_max_side or k.split("|")[0] in longest}
            truth = float64_truth(paths, keys)
            print(f"against a float64 SVD of the exact delta ({len(keys)} matrix-steps: smaller side <= "
                  f"{args.oracle_max_side}, embedding, lm_head):")
            for label, got in (("published", pub), ("exact", mine)):
                worst = differences({k: got[k] for k in keys}, truth)
                print(f"  {label:10s} " + "   ".join(f"{m} max rel {r:.2g}" for m, (_, r) in worst.items()))
        bounds = [v["bound"] / v["spectral_norm"] for v in mine.values() if v["spectral_norm"] > 0]
        print(f"  recorded Gram bound / spectral norm: max {max(bounds):.3g}, median {statistics.median(bounds):.3g}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
