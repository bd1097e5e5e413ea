"""The GPU check: vlm_probe at real model dimensions, in one command (``make gpu-check``).

Builds random models with the published configurations of Qwen2.5-VL-3B, Qwen2.5-VL-7B and
LLaVA-1.5-7B (dimensions, heads, vision tower, image-token counts of a 448 x 448 image)
directly in bf16 on the GPU (no download: the configs are written below from the published
config.json files), then, per model, in one run:
  noop         a trace that reads the logits equals the plain forward              (checked)
  tracing      trace_noop / plain and trace_all / hooks_all (tracing_overhead.py)  (timed)
  patching     the engine's sweep equals a naive hook loop, and its time ratio     (checked, timed)
               (patching_sweep.py: layer_out x vision/question/last, KL to clean)
  swap         the vision-token swap sweep equals one generate per start layer,    (checked, timed)
               and its time per start layer over one generate (vision_swap.py)
  mass         attention mass at --mass-tokens tokens (Qwen only: LLaVA-1.5 has 4,096 positions),
               chunked on sdpa vs eager weights: equal, time and peak memory ratios (checked, timed)
               (attention_mass.py; the eager weights reduced layer by layer inside the trace)
  attribution  attribution_sweep vs the exact sweep on the same cells: Spearman, top-10 share,
               time ratio (attribution.py)                                          (timed)
  device_map   the first model saved and reloaded with device_map="auto" and a max_memory split
               across GPU and CPU (CPU and disk with --small): the same logits and the same
               attribution estimates as the model on one device                    (checked)
  spectra      once, not per model: exact spectra (compare_weights, float64 Gram eigenvalues on the
               device) vs the published diversity script (float32 SVDs on one CPU thread) on the
               first 4 decoder layers of spectra.py's bf16 trio: time ratio, and spectral norm,
               effective rank and top-50 values equal to 1e-4 of the spectral norm   (checked, timed)
Prints a table (model, check, figures, result) and exits 1 when a check fails.

Without a GPU, ``--small`` runs tiny versions of the same three configurations (same family,
vision tower layout and token rules; few layers, narrow widths, 112 x 112 images) in float32
on the CPU in well under a minute; tests/test_gpu_check.py runs it. ``--perturb EPS`` adds EPS
to the reference logits of the equality checks (noop, device_map) and to the published spectral
norms (spectra): a self-test, those checks must then fail.

Tolerances: float32 checks are tight (1e-5 relative); bf16 allows 2e-2 of the logits' scale
(another kernel or device sums in another order) and 10% of greedy answers flipping in the
swap check (random models have near-tied top logits; every flip is counted in the table).

Sources of the configurations (config.json of each hub repository):
  https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
  https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
  https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/config.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import vlm_probe  # noqa: E402
from _common import interleaved, machine  # noqa: E402
from attention_mass import chunked_mass, eager_mass  # noqa: E402
from attribution import POSITIONS as ATTR_POSITIONS  # noqa: E402
from attribution import compare, contrast_metric  # noqa: E402
from patching_sweep import batched_patching, naive_patching  # noqa: E402
from tracing_overhead import variants as tracing_variants  # noqa: E402
from vision_swap import engine_swap, published_swap  # noqa: E402
from vlm_probe.analyses import attribution_sweep, sweep  # noqa: E402
from vlm_probe.analyses.generation import GreedyGenerator, greedy_config  # noqa: E402
from vlm_probe.testbed.zoo import TinyVLM, tiny_vlm  # noqa: E402

transformers.logging.set_verbosity_error()
CHECKS = ("noop", "tracing", "patching", "swap", "mass", "attribution", "device_map", "spectra")
#: the trio's tensors the spectra row compares (stored names): the first 4 decoder layers
SPECTRA_INCLUDE = r"layers\.[0-3]\."


@dataclass(frozen=True)
class Real:
    """A published configuration: the zoo recipe's sizes and the config.json values on top."""

    family: str
    sizes: dict[str, int]
    updates: dict[str, Any]
    small_sizes: dict[str, int]
    small_updates: dict[str, Any] = field(default_factory=dict)
    image: int = 448  #: image side (pixels); the processor gives the real token count
    positions: int = 128000  #: max_position_embeddings


def _qwen(d: int, layers: int, heads: int, kv: int, mlp: int, vocab: int, tie: bool, small_heads: int) -> Real:
    text = {"vocab_size": vocab, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 1000000.0}, "tie_word_embeddings": tie}
    vision = {"window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}  # hidden_act silu (the zoo's default)
    return Real(
        "qwen2_5_vl",
        sizes=dict(d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv, d_mlp=mlp, vision_d=1280,
                   vision_layers=32, vision_heads=16, vision_mlp=3420, patch=14),
        updates={"text_config": text, "vision_config": vision, "tie_word_embeddings": tie},
        small_sizes=dict(d_model=16 * small_heads, n_layers=4, n_heads=small_heads, n_kv_heads=small_heads * kv // heads,
                         d_mlp=256, vision_d=64, vision_layers=4, vision_heads=4, vision_mlp=128, patch=14),
        small_updates={"vision_config": {"window_size": 56, "fullatt_block_indexes": [1, 3]}},
    )


REAL: dict[str, Real] = {
    # Qwen/Qwen2.5-VL-3B-Instruct: 36 layers of 2048, 16 heads / 2 KV heads (head_dim 128), MLP 11008,
    # vocab 151936, tied embeddings; ViT 32 x 1280 (16 heads, MLP 3420, patch 14, 2x2 merge, window 112,
    # full attention in blocks 7/15/23/31). A 448 x 448 image: 32 x 32 patches -> 256 tokens.
    "qwen2.5-vl-3b": _qwen(2048, 36, 16, 2, 11008, 151936, True, small_heads=8),
    # Qwen/Qwen2.5-VL-7B-Instruct: 28 layers of 3584, 28 heads / 4 KV heads, MLP 18944, vocab 152064.
    "qwen2.5-vl-7b": _qwen(3584, 28, 28, 4, 18944, 152064, False, small_heads=7),
    # llava-hf/llava-1.5-7b-hf: Llama-2-7B text (32 x 4096, 32 heads, MLP 11008, vocab 32064, 4096
    # positions) and CLIP ViT-L/14-336 (24 x 1024, 16 heads, MLP 4096); any image is resized to
    # 336 x 336: 24 x 24 = 576 image tokens, the second-to-last block's features, a 2-layer GELU MLP.
    "llava-1.5-7b": Real(
        "llava",
        sizes=dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_mlp=11008, vision_d=1024,
                   vision_layers=24, vision_heads=16, vision_mlp=4096, patch=14, image_size=336),
        updates={"text_config": {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
                 "vision_config": {"projection_dim": 768}},
        small_sizes=dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_mlp=256, vision_d=64, vision_layers=4,
                         vision_heads=4, vision_mlp=128, patch=14, image_size=56),
        positions=4096,
    ),
}


@dataclass
class Row:
    model: str
    check: str
    figures: str
    ok: bool | None  #: None: a timing, no pass criterion


def build(name: str, small: bool, device: str, dtype: torch.dtype) -> tuple[TinyVLM, int]:
    """The random model of ``name`` (its image side returned too), parameters created on ``device``."""
    real = REAL[name]
    sizes, updates = (real.small_sizes, real.small_updates) if small else (real.sizes, real.updates)
    tiny = tiny_vlm(real.family, dtype=dtype, device=device, config_updates=updates, **sizes)
    image = 112 if small else real.image
    ip = tiny.processor.image_processor
    if real.family.startswith("qwen"):  # the zoo caps image sizes; let the real token counts through
        ip.max_pixels = ip.size["longest_edge"] = 14 * 14 * 4 * 16384
        ip.min_pixels = ip.size["shortest_edge"] = 14 * 14 * 4
    return tiny, image


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the scale of ``want``."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))


class Checker:
    """Runs the checks on one model and collects table rows."""

    def __init__(self, name: str, tiny: TinyVLM, image: int, args: argparse.Namespace, dtype: torch.dtype) -> None:
        self.name, self.tiny, self.args = name, tiny, args
        self.vlm = vlm_probe.load(tiny)
        self.rtol = 1e-5 if dtype == torch.float32 else 2e-2
        self.agree = 1.0 if dtype == torch.float32 else 0.9
        n = args.samples
        prompts = ["how many red circles are there ?"] * n
        self.clean = self.vlm.prepare(prompts, [[tiny.image(i, (image, image))] for i in range(n)])
        self.corrupt = self.vlm.prepare(prompts, [[tiny.image(100 + i, (image, image))] for i in range(n)])
        self.rows: list[Row] = []
        self.metric = contrast_metric(self.plain_logits(self.vlm, self.clean)[:, -1],
                                      self.plain_logits(self.vlm, self.corrupt)[:, -1])

    def row(self, check: str, figures: str, ok: bool | None) -> None:
        self.rows.append(Row(self.name, check, figures, ok))
        mark = {True: "ok", False: "FAIL", None: "-"}[ok]
        print(f"  {self.name:<14} {check:<12} {mark:<5} {figures}", flush=True)

    def plain_logits(self, vlm: Any, batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return vlm.hf(**{k: v.to(vlm.device) for k, v in batch.inputs.items()}).logits.float().cpu()

    def noop(self) -> None:
        vlm, batch = self.vlm, self.corrupt
        want = self.plain_logits(vlm, batch) + self.args.perturb
        with torch.no_grad(), vlm.trace(batch):
            logits = vlm.lm_head.output.save()
        err = _rel(logits.float().cpu(), want)
        self.row("noop", f"max |trace - forward| / max |logit| = {err:.1e} ({batch.width} tokens, "
                 f"{int(batch.layout.mask('vision')[0].sum())} image tokens)", err <= self.rtol)

    def tracing(self) -> None:
        t = interleaved(tracing_variants(self.vlm, self.corrupt), self.args.repeats, warmup=1)
        self.row("tracing", f"trace_noop / plain {t['trace_noop'] / t['plain']:.3f}, trace_all / hooks_all "
                 f"{t['trace_all'] / t['hooks_all']:.3f} (plain {t['plain'] * 1e3:.1f} ms)", None)

    def patching(self) -> None:
        vlm, clean, corrupt = self.vlm, self.clean, self.corrupt
        a = torch.tensor(batched_patching(vlm, clean, corrupt))
        b = torch.tensor(naive_patching(vlm, clean, corrupt))
        err = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        t = interleaved({"engine": lambda: batched_patching(vlm, clean, corrupt),
                         "naive": lambda: naive_patching(vlm, clean, corrupt)}, self.args.repeats, warmup=1)
        self.row("patching", f"{len(a)} values, max |engine - naive| / max = {err:.1e}; engine / naive = "
                 f"{t['engine'] / t['naive']:.3f} ({t['naive']:.2f} s naive)", err <= max(self.rtol, 1e-4))

    def swap(self) -> None:
        vlm, targets, sources = self.vlm, self.corrupt, self.clean
        config = greedy_config(vlm, max_new_tokens=self.args.new_tokens)
        generator = GreedyGenerator(vlm, config=config)
        x, y = engine_swap(vlm, targets, sources, config), published_swap(vlm, targets, sources, config)
        share = sum(p == q for p, q in zip(x, y)) / len(x)
        t = interleaved({"engine": lambda: engine_swap(vlm, targets, sources, config),
                         "published": lambda: published_swap(vlm, targets, sources, config),
                         "generate": lambda: generator(targets)}, self.args.repeats, warmup=1)
        self.row("swap", f"{len(x)} answers, {share:.0%} equal; engine per start layer / one generate = "
                 f"{t['engine'] / (vlm.n_layers * t['generate']):.3f}, engine / published = "
                 f"{t['engine'] / t['published']:.3f}", share >= self.agree)

    def mass(self) -> None:
        real, tiny = REAL[self.name], self.tiny
        tokens = self.args.mass_tokens
        if tokens > real.positions:
            self.row("mass", f"skipped: {tokens} tokens > {real.positions} positions", None)
            return
        side = 14 * 2 * max(1, int((tokens / 2) ** 0.5) // 1)  # about half the tokens in the image
        side = min(side, 14 * 2 * 64)
        prompt_words = max(1, (tokens - (side // 28) ** 2) // 10)
        batch = self.vlm.prepare(" ".join(["how many red circles are there in the picture ?"] * prompt_words),
                                 images=[tiny.image(0, (side, side))])
        cuda = self.vlm.device.type == "cuda"

        def measured(fn: Callable[[], list[float]]) -> tuple[list[float], float, float]:
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            times, out = [], []
            for _ in range(max(1, self.args.repeats)):
                start = time.perf_counter()
                out = fn()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
            return out, statistics.median(times), peak

        chunked, t_c, m_c = measured(lambda: chunked_mass(self.vlm, batch))
        eager = vlm_probe.load(tiny, attn_implementation="eager")  # switches this model's attention
        try:
            full, t_e, m_e = measured(lambda: eager_mass(eager, batch, save_weights=False))
        finally:
            self.vlm = vlm_probe.load(tiny, attn_implementation="sdpa")
        err = max(abs(a - b) for a, b in zip(chunked, full))
        memory = f", peak memory {m_c:.0f} / {m_e:.0f} MiB = {m_c / m_e:.2f}x" if cuda else ""
        self.row("mass", f"{batch.width} tokens, max |chunked - eager| = {err:.1e}; chunked / eager time "
                 f"{t_c / t_e:.2f}x ({t_c:.2f} s / {t_e:.2f} s){memory}", err <= max(self.rtol, 1e-5))

    def attribution(self) -> None:
        vlm, clean, corrupt = self.vlm, self.clean, self.corrupt
        kwargs = dict(site="layer_out", positions=ATTR_POSITIONS, metric=self.metric, progress=False)
        exact = sweep(vlm, clean, corrupt, **kwargs).frame
        estimated = attribution_sweep(vlm, clean, corrupt, **kwargs).frame
        r = compare(estimated, exact)
        t = interleaved({"exact": lambda: sweep(vlm, clean, corrupt, **kwargs),
                         "attribution": lambda: attribution_sweep(vlm, clean, corrupt, **kwargs)},
                        self.args.repeats, warmup=1)
        self.row("attribution", f"{r['cells']} cells: Spearman {r['spearman']:.3f}, top-10 {r['top10']:.0%}; "
                 f"exact / attribution time = {t['exact'] / t['attribution']:.1f}x", None)

    def device_map(self) -> None:
        tiny, vlm = self.tiny, self.vlm
        cuda = vlm.device.type == "cuda"
        with tempfile.TemporaryDirectory(dir=self.args.tmp) as tmp:
            path = tiny.save(Path(tmp) / "ckpt")
            size = sum(p.numel() * p.element_size() for p in tiny.model.parameters())
            if cuda:  # half the weights on the GPU, the rest in host memory
                memory = {0: f"{size // 2 // 2**20}MiB", "cpu": f"{2 * size // 2**20}MiB"}
                split = vlm_probe.load(path, dtype=next(tiny.model.parameters()).dtype, device_map="auto",
                                       max_memory=memory)
            else:
                memory = {"cpu": f"{size // 2 // 1024}KiB"}
                split = vlm_probe.load(path, device_map="auto", max_memory=memory, offload_folder=Path(tmp) / "off")
            places = sorted({str(d) for d in split.hf.hf_device_map.values()})
            want = self.plain_logits(vlm, self.corrupt) + self.args.perturb
            err = _rel(self.plain_logits(split, self.corrupt), want)
            kwargs = dict(site=["layer_out", "k"], positions=["vision", "last"], metric=self.metric, progress=False)
            a = attribution_sweep(split, self.clean, self.corrupt, **kwargs).frame["estimate"]
            b = attribution_sweep(vlm, self.clean, self.corrupt, **kwargs).frame["estimate"]
            err_a = float((a - b).abs().max() / max(b.abs().max(), 1e-12))
            del split
        ok = err <= self.rtol and err_a <= 10 * self.rtol and len(places) > 1
        self.row("device_map", f"split over {'+'.join(places)} ({memory}): max |split - one device| / max = "
                 f"{err:.1e} (logits), {err_a:.1e} (attribution)", ok)


def spectra_row(args: argparse.Namespace) -> Row:
    """The ``spectra`` check: ``benchmarks/spectra.py``'s two variants on part of its trio, in this process."""
    import spectra
    import weight_deltas

    from vlm_probe.threads import torch_threads

    if args.small:  # the layout of spectra.py --small
        weight_deltas.TEXT.update(hidden=64, layers=2, intermediate=160, heads=4, kv_heads=2, vocab=500)
        weight_deltas.VISION.update(hidden=32, depth=2, intermediate=48, out=64, merge=4)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        paths = {k: str(v) for k, v in weight_deltas.generate(
            Path(tmp), keep=lambda name: re.search(SPECTRA_INCLUDE, name) is not None).items()}
        with torch_threads(1):  # as the CPU benchmark times it
            start = time.perf_counter()
            reference = spectra.published(paths, SPECTRA_INCLUDE)
            t_published = time.perf_counter() - start
        start = time.perf_counter()
        exact = spectra.ours(paths, vectors=False, include=SPECTRA_INCLUDE)  # on the GPU when there is one
        t_exact = time.perf_counter() - start
    worst = 0.0  # spectral norm and top-50: |exact - published| / spectral norm; effective rank: relative
    for key, want in reference.items():
        got, norm = exact[key], want["spectral_norm"]
        values = [(got["spectral_norm"], norm + args.perturb), *zip(got["top"], want["top"])]
        worst = max(worst, max(abs(a - b) for a, b in values) / norm, abs(got["erank"] / want["erank"] - 1))
    same = sorted(reference) == sorted(exact) and len(reference) > 0
    place = "cuda" if torch.cuda.is_available() else "cpu"
    return Row("trio", "spectra", f"{len(reference)} matrix-steps (decoder layers 0-3): published (CPU, 1 thread) "
               f"{t_published:.1f} s / exact ({place}) {t_exact:.1f} s = {t_published / t_exact:.1f}x; max "
               f"difference {worst:.1e} of the spectral norm (effective rank: relative)", same and worst <= 1e-4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny versions of the configurations, on the CPU")
    parser.add_argument("--models", nargs="*", default=list(REAL), choices=list(REAL))
    parser.add_argument("--checks", nargs="*", default=list(CHECKS), choices=CHECKS)
    parser.add_argument("--samples", type=int, default=None, help="samples per batch (default 4; 2 with --small)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3; 1 with --small)")
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--mass-tokens", type=int, default=None, help="sequence length (default 8192; 512 small)")
    parser.add_argument("--perturb", type=float, default=0.0,
                        help="add this to the reference logits of the equality checks and the published spectral "
                        "norms (they must then fail)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--tmp", default=None, help="directory for the device_map checkpoint and the spectra trio")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.small else 3)
    args.samples = args.samples or (2 if args.small else 4)
    args.mass_tokens = args.mass_tokens or (512 if args.small else 8192)
    cuda = torch.cuda.is_available() and not args.small
    if not cuda and not args.small:
        parser.error("no GPU here: run with --small (tiny versions of the configurations on the CPU)")
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.set_num_threads(1 if not cuda else torch.get_num_threads())
    print("machine:", machine(), "|", torch.cuda.get_device_name(0) if cuda else "CPU", "|", dtype)
    start, rows = time.perf_counter(), []
    for i, name in enumerate(args.models):
        built = time.perf_counter()
        tiny, image = build(name, args.small, device, dtype)
        params = sum(p.numel() for p in tiny.model.parameters())
        print(f"\n{name}: {params / 1e6:,.1f} M parameters, built in {time.perf_counter() - built:.1f} s")
        checker = Checker(name, tiny, image, args, dtype)
        for check in args.checks:
            if check == "spectra" or (check == "device_map" and i > 0):
                continue  # device_map: the first model only (a save and a split reload); spectra: below
            getattr(checker, check)()
        rows += checker.rows
        del checker, tiny
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if "spectra" in args.checks:
        rows.append(spectra_row(args))
        print(f"  {'trio':<14} {'spectra':<12} {({True: 'ok', False: 'FAIL'}[bool(rows[-1].ok)]):<5} "
              f"{rows[-1].figures}", flush=True)
    failed = [r for r in rows if r.ok is False]
    print(f"\n{'model':<14} {'check':<12} {'result':<6} figures")
    for r in rows:
        print(f"{r.model:<14} {r.check:<12} {({True: 'ok', False: 'FAIL', None: '-'}[r.ok]):<6} {r.figures}")
    print(f"\n{len(rows) - len(failed)} of {len(rows)} rows passed or timed, {len(failed)} failed; "
          f"{time.perf_counter() - start:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
