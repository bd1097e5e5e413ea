"""``vlm-probe swap`` and ``vlm-probe ablate``: the published localization probes on a dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_model_options, check_out, load_model, parse_layers, positive_int, write_figure

SWAP_EXAMPLE = """example:
  vlm-probe swap ckpt/rl --data shared/data/vision_swap_pairs/counting --out runs/rl-swap --layers 0-27
writes runs/rl-swap/swap/ (table.parquet, meta.json), swap.html and prints change rates per layer."""

ABLATE_EXAMPLE = """example:
  vlm-probe ablate ckpt/rl --data math_text.jsonl --out runs/rl-ablate --max-new-tokens 16
writes runs/rl-ablate/ablation/ (table.parquet, meta.json), ablation.html and prints accuracy per layer."""


def register(sub: argparse._SubParsersAction) -> None:
    swap = sub.add_parser("swap", help="vision-token swap localization on swap pairs",
                          description="Swap the target image's vision-token keys/values with the source "
                          "image's from each layer on, and grade the greedy answers.",
                          epilog=SWAP_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    swap.add_argument("model", help="checkpoint directory or hub id")
    swap.add_argument("--data", required=True, help="swap-pair jsonl, task folder or root folder (required)")
    swap.add_argument("--out", required=True, help="output directory (required)")
    swap.add_argument("--layers", help="start layers, e.g. 0-27 or 0,8,16 (0-based; default all)")
    swap.add_argument("--mode", choices=["from", "only"], default="from",
                      help="swap in every layer from L on (as published) or in layer L only")
    swap.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per answer")
    swap.add_argument("--limit", type=positive_int, help="only the first N pairs (default: every pair)")
    swap.add_argument("--max-rows", type=positive_int, default=64, help="rows per batched generation")
    add_model_options(swap)
    swap.set_defaults(func=run_swap)

    ablate = sub.add_parser("ablate", help="layer-ablation localization on VQA or text items",
                            description="Make each decoder layer the identity in turn and grade the greedy answers.",
                            epilog=ABLATE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    ablate.add_argument("model", help="checkpoint directory or hub id")
    ablate.add_argument("--data", required=True, help="VQA or text-only jsonl (required)")
    ablate.add_argument("--out", required=True, help="output directory (required)")
    ablate.add_argument("--layers", help="layers, e.g. 0-27 (0-based; default all)")
    ablate.add_argument("--condition", choices=["image", "blank", "description", "text"], default=None,
                        help="prompt condition (default: text for text-only items, image otherwise)")
    ablate.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens generated per answer")
    ablate.add_argument("--limit", type=positive_int, help="only the first N items (default: every item)")
    ablate.add_argument("--max-rows", type=positive_int, default=64, help="rows per batched generation")
    add_model_options(ablate)
    ablate.set_defaults(func=run_ablate)


def run_swap(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import load_swap_pairs
    from ..evaluation.probes import swap_localization

    layers = parse_layers(args.layers)
    check_out(args.out)
    pairs = load_swap_pairs(args.data, limit=args.limit)  # bad data fails before the model loads
    vlm = load_model(args.model, args)
    result = swap_localization(vlm, pairs, layers=layers, mode=args.mode,
                               max_new_tokens=args.max_new_tokens, max_rows=args.max_rows, progress=not args.quiet)
    out = Path(args.out)
    result.save(out / "swap")
    write_figure(result.plot(), out / "swap.html")
    rates = result.rates()
    print(rates[["unified_layer", "changed", "changed_low", "changed_high", "target_correct"]].to_string(index=False))
    if len(rates) > 1:
        t = result.transition_layer()
        print(f"transition layer: L{t['unified_layer']} (95% range L{t['low'] + 1}-L{t['high'] + 1})")
    print(f"wrote {out / 'swap'} and {out / 'swap.html'}")
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from ..evaluation.datasets import load_dataset
    from ..evaluation.probes import ablation_localization

    layers = parse_layers(args.layers)
    check_out(args.out)
    items = load_dataset(args.data, limit=args.limit)
    vlm = load_model(args.model, args)
    result = ablation_localization(vlm, items, condition=args.condition, layers=layers,
                                   max_new_tokens=args.max_new_tokens, max_rows=args.max_rows,
                                   progress=not args.quiet)
    out = Path(args.out)
    result.save(out / "ablation")
    write_figure(result.plot(), out / "ablation.html")
    summary = result.summary()
    print(f"baseline accuracy: {summary.attrs['baseline']:.3f}")
    print(summary[["unified_layer", "value", "low", "high", "change"]].to_string(index=False))
    print(f"wrote {out / 'ablation'} and {out / 'ablation.html'}")
    return 0
