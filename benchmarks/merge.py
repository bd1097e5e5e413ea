"""Writing a block merge of two generated checkpoints (>= 1 GB each): streamed vs the published approach vs mergekit.

Generates IN and RL with weight_deltas.py's generator (bf16, a real Qwen2.5-VL config.json, 1.24 GB
each) and writes the IN:RL:IN merge (RL's middle third of decoder layers put into IN) with every
variant, each in a fresh subprocess with 1 torch thread, variants interleaved, median of N:

  copy          copy IN's shard files (the I/O floor: a merge reads one checkpoint's worth of tensors,
                some from IN, some from RL, and writes one)
  vlm_probe     write_merge(thirds_plan("IN:RL:IN")): streamed, one tensor in memory at a time
  published     the published scripts minus model construction: both state dicts whole (safetensors
                load_file of every shard), the mid third taken from RL, save_file per 2 GB shard
  published_hf  the published scripts as written: Qwen2_5_VLForConditionalGeneration.from_pretrained
                twice, the mid layers copied over, save_pretrained (2 GB shards)
  mergekit      mergekit-yaml (its click command, in the child) on vlm_probe's exported config,
                --out-shard-size 2B -j 1; skipped where .venv/mergekit is absent

Time is the work after imports, up to an fsync of every output file (write_merge fsyncs its own;
the harness does it for the others), so every variant ends with the merge on disk. Each run is
cold (inputs dropped from the OS page cache) and hot. Peak RSS is the kernel's VmHWM; heap
(RssAnon) and mapped file pages (RssFile) are sampled apart. "base" is RSS after imports. After
the timed runs, every variant's output is compared tensor for tensor with vlm_probe's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from weight_deltas import Sampler, drop_cache, generate, shapes, warm_cache

HERE = Path(__file__).resolve().parent
MERGEKIT = Path(os.environ.get("VLM_PROBE_MERGEKIT", HERE.parent / ".venv" / "mergekit"))
SHARD_BYTES = 2 * 10**9  # "2GB": write_merge's default, transformers' max_shard_size="2GB", mergekit's 2B
OPTIONAL = ("published_hf", "mergekit")


# ----------------------------------------------------------------------------- child process


def copy_floor(job: dict) -> None:
    """Copy IN's shard files, 4 MB at a time: the bytes any merge must read and write."""
    out = Path(job["out"])
    out.mkdir()
    view = memoryview(bytearray(4 * 2**20))
    for file in sorted(Path(job["IN"]).glob("*.safetensors")):
        src = os.open(file, os.O_RDONLY)
        dst = os.open(out / file.name, os.O_WRONLY | os.O_CREAT, 0o644)
        while n := os.readv(src, [view]):
            os.write(dst, view[:n])
        os.close(src)
        os.close(dst)


def published(job: dict) -> None:
    """Both state dicts whole, the mid layers' tensors from RL, sharded save_file."""
    from _common import full_state_dict
    from safetensors.torch import save_file

    host, donor = full_state_dict(job["IN"]), full_state_dict(job["RL"])
    lo, hi = job["cuts"]
    merged = {k: donor[k] if k.startswith("model.layers.") and lo <= int(k.split(".")[2]) < hi else v
              for k, v in host.items()}
    shards: list[dict] = [{}]
    size = 0
    for key, value in merged.items():
        nbytes = value.numel() * value.element_size()
        if size and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    out = Path(job["out"])
    out.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy2(Path(job["IN"]) / "config.json", out / "config.json")


def published_hf(job: dict) -> None:
    """from_pretrained twice, the mid decoder layers loaded from RL, save_pretrained."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration as Model

    host = Model.from_pretrained(job["IN"], dtype=torch.bfloat16)
    donor = Model.from_pretrained(job["RL"], dtype=torch.bfloat16)
    lo, hi = job["cuts"]
    for i in range(lo, hi):
        host.model.language_model.layers[i].load_state_dict(donor.model.language_model.layers[i].state_dict())
    host.save_pretrained(job["out"], max_shard_size="2GB")


def vlm_probe_merge(job: dict) -> None:
    from vlm_probe.weights.merge import write_merge
    from vlm_probe.weights.plans import thirds_plan

    write_merge(thirds_plan("IN:RL:IN", cuts=job["cuts"]), {"IN": job["IN"], "RL": job["RL"]}, job["out"],
                progress=False)


def mergekit_merge(job: dict) -> None:
    from mergekit.scripts.run_yaml import main

    main.main([job["mergekit"], job["out"], "--out-shard-size", "2B", "-j", "1"], standalone_mode=False)


#: variant -> (module imported before the clock starts, work)
WORK = {
    "copy": ("torch", copy_floor),
    "vlm_probe": ("vlm_probe.weights.merge", vlm_probe_merge),
    "published": ("safetensors.torch", published),
    "published_hf": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", published_hf),
    "mergekit": ("mergekit.scripts.run_yaml", mergekit_merge),
}


def run_variant(variant: str, job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    module, work = WORK[variant]
    importlib.import_module(module)
    base = Sampler.status()
    with Sampler() as sampler:
        start = time.perf_counter()
        work(job)
        for file in Path(job["out"]).rglob("*"):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
        seconds = time.perf_counter() - start
    end = Sampler.status()
    return {"seconds": seconds, "peak_mb": end["VmHWM"], "base_mb": base["VmRSS"],
            "peak_anon_mb": sampler.anon, "peak_file_mb": sampler.file}


# ----------------------------------------------------------------------------- parent


def child(variant: str, job: dict) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if variant == "mergekit":
        env["PYTHONPATH"] = str(MERGEKIT)
    done = subprocess.run([sys.executable, __file__, "--child", variant, "--job", json.dumps(job)],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def identical(ours: Path, theirs: Path) -> str:
    """'yes', or what differs: every tensor compared by module path (stored names may differ)."""
    import torch

    from vlm_probe.weights.reader import open_checkpoint

    a, b = open_checkpoint(ours), open_checkpoint(theirs)
    if set(a.tensors) != set(b.tensors):
        return f"no (tensor names differ: {sorted(set(a.tensors) ^ set(b.tensors))[:3]})"
    differing = [name for name in a.tensors if not torch.equal(a.tensor(name), b.tensor(name))]
    if differing:
        return f"no ({len(differing)} tensors differ, e.g. {differing[0]})"
    return f"yes ({len(a.tensors)} tensors)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write IN and RL (kept; reused if already there). Default: a "
                        "temporary directory, removed after. Merge outputs are always removed")
    parser.add_argument("--child")
    parser.add_argument("--job")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, json.loads(args.job))))
        return

    from _common import machine

    from vlm_probe.weights.merge import open_all
    from vlm_probe.weights.mergekit_export import mergekit_yaml
    from vlm_probe.weights.plans import thirds_plan
    from vlm_probe.weights.regions import Cuts

    print("machine:", machine(), "(each variant runs in a subprocess with 1 torch thread)")
    print("load average:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vlm_probe_merge_"))
    outs = root / "merges"
    try:
        paths = {name: str(root / name) for name in ("IN", "RL")}
        if all((Path(p) / "model.safetensors.index.json").is_file() for p in paths.values()):
            print(f"reusing IN and RL in {root}")
        else:
            print(f"generating IN and RL in {root} ...", flush=True)
            t0 = time.perf_counter()
            generate(root, names=("IN", "RL"))
            print(f"  generated in {time.perf_counter() - t0:.0f} s")
        table = shapes()
        largest_mb = max(2 * math.prod(s) for s in table.values()) / 2**20
        gb = sum(f.stat().st_size for f in Path(paths["IN"]).glob("*.safetensors")) / 1e9
        print(f"inputs: 2 x {gb:.2f} GB (bf16, {sum(math.prod(s) for s in table.values()) / 1e6:.0f} M parameters), "
              f"largest tensor {largest_mb:.0f} MiB; merge IN:RL:IN, {SHARD_BYTES / 1e9:g} GB shards")

        checkpoints = open_all(paths)
        cuts = Cuts.make(None, checkpoints["IN"].n_layers)
        variants = list(WORK)
        job = {**paths, "cuts": [cuts.mid, cuts.late]}
        if (MERGEKIT / "mergekit").is_dir():
            job["mergekit"] = str(root / "mergekit.yml")
            Path(job["mergekit"]).write_text(mergekit_yaml(thirds_plan("IN:RL:IN", cuts=job["cuts"]), checkpoints))
        else:
            print(f"mergekit skipped: not installed at {MERGEKIT} (make install puts it there)")
            variants.remove("mergekit")

        results: dict[tuple[str, str], list[dict]] = {}
        for rep in range(args.repeats):
            for cache in ("cold", "hot"):
                for variant in list(variants):
                    out = outs / variant
                    shutil.rmtree(out, ignore_errors=True)
                    outs.mkdir(parents=True, exist_ok=True)
                    if cache == "cold":
                        drop_cache(paths)
                    else:
                        warm_cache(paths)
                    try:
                        result = child(variant, {**job, "out": str(out)})
                    except RuntimeError as error:
                        if variant not in OPTIONAL:
                            raise
                        print(f"{variant} skipped: {error}")
                        variants.remove(variant)
                        results = {k: v for k, v in results.items() if k[0] != variant}
                        continue
                    results.setdefault((variant, cache), []).append(result)
            print(f"  repeat {rep + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.2f})", flush=True)

        def med(variant: str, cache: str, key: str) -> float:
            return statistics.median(r[key] for r in results[(variant, cache)])

        print(f"\n{'variant':13s} {'cache':5s} {'time s':>7s} {'(range)':>11s} {'peak RSS MB':>12s} {'heap MB':>8s} "
              f"{'mapped MB':>10s} {'base MB':>8s}")
        for variant, cache in sorted(results, key=lambda k: (k[1], variants.index(k[0]))):
            m = {key: med(variant, cache, key) for key in results[(variant, cache)][0]}
            times = [r["seconds"] for r in results[(variant, cache)]]
            print(f"{variant:13s} {cache:5s} {m['seconds']:7.2f} {f'({min(times):.1f}-{max(times):.1f})':>11s} "
                  f"{m['peak_mb']:12.0f} {m['peak_anon_mb']:8.0f} {m['peak_file_mb']:10.0f} {m['base_mb']:8.0f}")
        print("\nratios to published (medians; time, peak RSS):")
        for cache in ("cold", "hot"):
            ratios = [f"{v} {med(v, cache, 'seconds') / med('published', cache, 'seconds'):.2f}, "
                      f"{med(v, cache, 'peak_mb') / med('published', cache, 'peak_mb'):.2f}"
                      for v in variants if v != "published"]
            print(f"  {cache}: " + "; ".join(ratios))
        peak, base = med("vlm_probe", "cold", "peak_mb"), med("vlm_probe", "cold", "base_mb")
        print(f"  vlm_probe peak RSS above its post-import base: {peak - base:.0f} MB "
              f"(largest tensor {largest_mb:.0f} MiB)")
        print("\noutputs identical to vlm_probe's:")
        for variant in variants:
            if variant not in ("copy", "vlm_probe"):
                print(f"  {variant}: identical: {identical(outs / 'vlm_probe', outs / variant)}")
    finally:
        shutil.rmtree(outs, ignore_errors=True)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
