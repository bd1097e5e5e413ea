"""Weight deltas on a generated checkpoint trio (>= 1 GB each): streaming vs loading three models whole.

Writes a Base / IN / RL trio of bf16 safetensors shards with a real Qwen2.5-VL config.json
(text 896 x 16 layers, vocabulary 151,936, a 4-block 1280-wide vision tower), then runs each
variant in a fresh subprocess (clean peak-RSS readings), variants interleaved, median of N:

  read_raw          read every shard file of the three checkpoints from disk, 4 MB at a time
  read_raw_seq      the same with POSIX_FADV_SEQUENTIAL (doubled kernel read-ahead: the floor)
  read_safetensors  safe_open each file, get_tensor every tensor, drop it (one file open at a time)
  stream_norms      compare_weights(svd="none"): every norm, energy, cosine, sign agreement
  stream_norms_noprefetch  the same without the read-ahead thread
  published         the published approach: three full state dicts in memory, deltas in fp16
                    (Frobenius, relative norm, energy per tensor)
  stream_randomized compare_weights(svd="randomized", top_k=50), once (with --svd)

Each run is timed cold (the files dropped from the OS page cache with posix_fadvise) and hot.
Peak RSS is the kernel's VmHWM; heap (RssAnon) and mapped file pages (RssFile) are sampled
apart every 5 ms. "base" is RSS after imports, before any work.
Goals: stream_norms peak RSS < 2 x largest tensor + 300 MB; stream_norms time <= 1.2 x read_raw.
Timings on a shared machine are noisy: the load average is printed with each repeat.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent

TEXT = dict(hidden=896, layers=16, intermediate=4864, heads=14, kv_heads=2, vocab=151936)
VISION = dict(hidden=1280, depth=4, intermediate=3420, out=896, merge=4)


def config() -> dict:
    return {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "hidden_size": TEXT["hidden"], "num_hidden_layers": TEXT["layers"], "intermediate_size": TEXT["intermediate"],
        "num_attention_heads": TEXT["heads"], "num_key_value_heads": TEXT["kv_heads"], "vocab_size": TEXT["vocab"],
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vision_config": {"depth": VISION["depth"], "hidden_size": VISION["hidden"],
                          "intermediate_size": VISION["intermediate"], "out_hidden_size": VISION["out"]},
    }


def shapes() -> dict[str, tuple[int, ...]]:
    """Stored (transformers-5 legacy) names and shapes of the generated model."""
    d, f, v = TEXT["hidden"], TEXT["intermediate"], TEXT["vocab"]
    kv = TEXT["kv_heads"] * d // TEXT["heads"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(TEXT["layers"]):
        p = f"model.layers.{i}."
        out.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
        })
    out["model.norm.weight"] = (d,)
    out["lm_head.weight"] = (v, d)
    h, fi = VISION["hidden"], VISION["intermediate"]
    out["visual.patch_embed.proj.weight"] = (h, 3, 2, 14, 14)
    for j in range(VISION["depth"]):
        p = f"visual.blocks.{j}."
        out.update({
            p + "norm1.weight": (h,), p + "norm2.weight": (h,),
            p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,),
            p + "attn.proj.weight": (h, h), p + "attn.proj.bias": (h,),
            p + "mlp.gate_proj.weight": (fi, h), p + "mlp.up_proj.weight": (fi, h), p + "mlp.down_proj.weight": (h, fi),
            p + "mlp.gate_proj.bias": (fi,), p + "mlp.up_proj.bias": (fi,), p + "mlp.down_proj.bias": (h,),
        })
    m = h * VISION["merge"]
    out.update({"visual.merger.ln_q.weight": (h,), "visual.merger.mlp.0.weight": (m, m), "visual.merger.mlp.0.bias": (m,),
                "visual.merger.mlp.2.weight": (VISION["out"], m), "visual.merger.mlp.2.bias": (VISION["out"],)})
    return out


def _tensor(name: str, shape: tuple[int, ...], which: int):
    """Deterministic weights: Base random, IN = Base + noise, RL = IN + noise growing with depth."""
    import torch

    seed = zlib.crc32(name.encode())
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    if which >= 1:
        w += torch.randn(shape, generator=g) * 2e-3
    if which >= 2:
        depth = int(name.split(".")[2]) + 1 if name.startswith("model.layers.") else 1
        w += torch.randn(shape, generator=g) * 2e-4 * depth
    return w.to(torch.bfloat16)


def generate(
    root: Path, shard_bytes: int = 512 * 2**20, names: tuple[str, ...] = ("Base", "IN", "RL"),
    keep: Callable[[str], bool] | None = None,
) -> dict[str, Path]:
    """Write the checkpoints ``names`` (of Base, IN, RL) under ``root``; their paths. ``keep``:
    write only the tensors whose stored name it accepts (default all)."""
    from safetensors.torch import save_file

    table = {k: v for k, v in shapes().items() if keep is None or keep(k)}
    paths = {}
    for name in names:
        which = ("Base", "IN", "RL").index(name)
        path = root / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(config()))
        shards: list[list[str]] = [[]]
        size = 0
        for key, shape in table.items():
            nbytes = 2 * math.prod(shape)
            if size and size + nbytes > shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        weight_map = {}
        for i, keys in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file({k: _tensor(k, table[k], which) for k in keys}, path / file, metadata={"format": "pt"})
            weight_map.update({k: file for k in keys})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        paths[name] = path
        print(f"  wrote {name}: {sum(f.stat().st_size for f in path.glob('*.safetensors')) / 1e9:.2f} GB "
              f"in {len(shards)} shards", flush=True)
    return paths


# ----------------------------------------------------------------------------- child process


class Sampler:
    """Samples RssAnon / RssFile every 5 ms; VmHWM gives the kernel's total peak."""

    def __init__(self) -> None:
        self.anon = self.file = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, float]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _files(paths: dict[str, str]) -> list[Path]:
    return sorted(f for p in paths.values() for f in Path(p).glob("*.safetensors"))


def run_variant(variant: str, paths: dict[str, str]) -> dict:
    import torch

    torch.set_num_threads(1)
    if variant.startswith("stream"):
        from vlm_probe.weights import compare_weights
    else:
        from safetensors import safe_open  # noqa: F401
        from safetensors.torch import load_file  # noqa: F401
    base = Sampler.status()
    with Sampler() as sampler:
        start = time.perf_counter()
        if variant in ("read_raw", "read_raw_seq"):
            buffer = bytearray(4 * 2**20)
            view = memoryview(buffer)
            for file in _files(paths):
                fd = os.open(file, os.O_RDONLY)
                if variant == "read_raw_seq":
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                while os.readv(fd, [view]):
                    pass
                os.close(fd)
        elif variant == "read_safetensors":
            from safetensors import safe_open

            for file in _files(paths):
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        f.get_tensor(key).clone()  # get_tensor maps lazily; clone reads the bytes
        elif variant == "stream_norms":
            compare_weights(paths, svd="none", quiet=True)
        elif variant == "stream_norms_noprefetch":
            compare_weights(paths, svd="none", quiet=True, prefetch=0)
        elif variant == "stream_randomized":
            compare_weights(paths, svd="randomized", top_k=50, quiet=True)
        elif variant == "published":
            published(paths)
        else:
            raise ValueError(variant)
        seconds = time.perf_counter() - start
    end = Sampler.status()
    return {"seconds": seconds, "peak_mb": end["VmHWM"], "base_mb": base["VmRSS"],
            "peak_anon_mb": sampler.anon, "peak_file_mb": sampler.file}


def published(paths: dict[str, str]) -> None:
    """Three full state dicts in memory, fp16 deltas, norms per tensor (the published script's approach)."""
    import torch
    from _common import full_state_dict

    models = [full_state_dict(path) for path in paths.values()]
    base, inn, rl = models
    rows = []
    for key in base:
        b, i, r = base[key].half(), inn[key].half(), rl[key].half()
        for before, after in ((b, i), (i, r)):
            delta = after - before
            frob = torch.linalg.norm(delta.float()).item()
            rows.append((key, frob, frob / max(torch.linalg.norm(before.float()).item(), 1e-12), frob**2))


# ----------------------------------------------------------------------------- parent


def drop_cache(paths: dict[str, str]) -> None:
    for file in _files(paths):
        fd = os.open(file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm_cache(paths: dict[str, str]) -> None:
    buffer = memoryview(bytearray(16 * 2**20))
    for file in _files(paths):
        fd = os.open(file, os.O_RDONLY)
        while os.readv(fd, [buffer]):
            pass
        os.close(fd)


def child(variant: str, paths: dict[str, str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, "--paths", json.dumps(paths)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", help="where to write the trio (kept; reused if already there). Default: a "
                        "temporary directory, removed after")
    parser.add_argument("--svd", action="store_true", help="also time stream_randomized once (minutes on CPU)")
    parser.add_argument("--child")
    parser.add_argument("--paths")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, json.loads(args.paths))))
        return

    sys.path.insert(0, str(HERE))
    from _common import machine

    print("machine:", machine(), "(each variant runs in a subprocess with 1 torch thread)")
    print("load average:", ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="vlm_probe_weights_"))
    try:
        if all((root / name / "model.safetensors.index.json").is_file() for name in ("Base", "IN", "RL")):
            paths = {name: str(root / name) for name in ("Base", "IN", "RL")}
            print(f"reusing the trio in {root}")
        else:
            print(f"generating the trio in {root} ...", flush=True)
            t0 = time.perf_counter()
            paths = {k: str(v) for k, v in generate(root).items()}
            print(f"  generated in {time.perf_counter() - t0:.0f} s")
        table = shapes()
        largest_mb = max(2 * math.prod(s) for s in table.values()) / 2**20
        total_gb = sum(f.stat().st_size for f in _files(paths)) / 1e9
        print(f"trio: {total_gb:.2f} GB on disk, {sum(math.prod(s) for s in table.values()) / 1e6:.0f} M parameters "
              f"per checkpoint (bf16), largest tensor {largest_mb:.0f} MiB")

        variants = ["read_raw", "read_raw_seq", "read_safetensors", "stream_norms", "stream_norms_noprefetch",
                    "published"]
        results: dict[tuple[str, str], list[dict]] = {}
        for rep in range(args.repeats):
            for cache in ("cold", "hot"):
                for variant in variants:
                    if cache == "cold":
                        drop_cache(paths)
                    else:
                        warm_cache(paths)
                    results.setdefault((variant, cache), []).append(child(variant, paths))
            print(f"  repeat {rep + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.2f})", flush=True)
        if args.svd:
            warm_cache(paths)
            results[("stream_randomized", "hot")] = [child("stream_randomized", paths)]

        def med(variant: str, cache: str, key: str) -> float:
            return statistics.median(r[key] for r in results[(variant, cache)])

        print(f"\n{'variant':18s} {'cache':5s} {'time s':>8s} {'peak RSS MB':>12s} {'heap MB':>9s} "
              f"{'mapped MB':>10s} {'base MB':>8s}")
        for (variant, cache) in results:
            print(f"{variant:18s} {cache:5s} {med(variant, cache, 'seconds'):8.2f} {med(variant, cache, 'peak_mb'):12.0f} "
                  f"{med(variant, cache, 'peak_anon_mb'):9.0f} {med(variant, cache, 'peak_file_mb'):10.0f} "
                  f"{med(variant, cache, 'base_mb'):8.0f}")
        goal = 2 * largest_mb + 300
        print("\nratios (medians):")
        for cache in ("cold", "hot"):
            t = {v: med(v, cache, "seconds") for v in variants}
            print(f"  {cache}: stream_norms / read_raw = {t['stream_norms'] / t['read_raw']:.2f} (goal <= 1.2); "
                  f"stream_norms / read_raw_seq = {t['stream_norms'] / t['read_raw_seq']:.2f}; "
                  f"stream_norms / read_safetensors = {t['stream_norms'] / t['read_safetensors']:.2f}; "
                  f"published / stream_norms = {t['published'] / t['stream_norms']:.2f}; "
                  f"no read-ahead / read-ahead = {t['stream_norms_noprefetch'] / t['stream_norms']:.2f}")
        peak = med("stream_norms", "cold", "peak_mb")
        base = med("stream_norms", "cold", "base_mb")
        print(f"  stream_norms peak RSS {peak:.0f} MB vs goal 2 x {largest_mb:.0f} + 300 = {goal:.0f} MB "
              f"({'met' if peak < goal else 'NOT met'}); above its post-import base: {peak - base:.0f} MB")
        print(f"  published peak RSS {med('published', 'cold', 'peak_mb'):.0f} MB = "
              f"{med('published', 'cold', 'peak_mb') / peak:.1f} x stream_norms")
        if ("stream_randomized", "hot") in results:
            r = results[("stream_randomized", "hot")][0]
            print(f"  stream_randomized (top-50): {r['seconds']:.1f} s, peak RSS {r['peak_mb']:.0f} MB "
                  f"(heap {r['peak_anon_mb']:.0f}, mapped {r['peak_file_mb']:.0f}; goal {goal:.0f} MB: "
                  f"{'met' if r['peak_mb'] < goal else 'NOT met'})")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
