"""``distopt bench zo``: peak memory of a zeroth-order step vs inference vs AdamW fine-tuning.

    distopt bench zo [--sizes tiny,small,medium] [--batch 4] [--seq 128] [--device cpu|cuda]
                     [--optimizer zo_sgd] [-n 1] [--threads N] [--json PATH] [--plain]

One row per model size (LLaMA-architecture causal LM from a config, random init): model MB,
peak MB of a forward pass, of a ZO step (on_use and in_place perturbation), of an AdamW
fine-tuning step (forward + backward + step), the ratios to inference, and the bytes a
data-parallel step communicates (DP-ZO: 8·n; DDP AdamW: 4·params). See
:mod:`distopt.bench.zo_memory` for how memory is measured on CPU (exact live-tensor bytes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def cmd_zo(args: argparse.Namespace) -> int:
    import torch

    from distopt.bench.table import render_table
    from distopt.bench.zo_memory import SIZES, bench_zo_memory

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"error: unknown size(s) {unknown}; choose from {', '.join(SIZES)}", file=sys.stderr)
        return 2
    old = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        rows = bench_zo_memory(sizes, args.batch, args.seq, args.device, args.optimizer, args.n,
                               progress=None if args.quiet else lambda s: print(s, file=sys.stderr))
    finally:
        torch.set_num_threads(old)
    columns = ("model", "params", "model MB", "inference MB", "ZO MB", "ZO/inf", "ZO in_place MB", "in_place/inf",
               "AdamW MB", "AdamW/inf", "DP-ZO B/step", "DDP AdamW B/step")
    table = [(r["model"], f"{r['params'] / 1e6:.2f}M", r["model_mb"], r["inference_mb"], r["zo_mb"],
              r["zo_over_inference"], r["zo_in_place_mb"], r["zo_in_place_over_inference"], r["adamw_mb"],
              r["adamw_over_inference"], r["dp_zo_bytes_per_step"], r["ddp_adamw_bytes_per_step"]) for r in rows]
    arch = rows[0]["arch"] if rows else "-"
    title = (f"peak memory, {arch} fp32, batch {args.batch} x {args.seq} tokens, {args.device}; ZO = "
             f"{args.optimizer} n={args.n}")
    render_table(columns, table, title=title, plain=args.plain)
    worst = max((r["zo_over_inference"] for r in rows), default=0.0)
    print(f"target ZO step peak <= 1.1x inference peak: {'met' if worst <= 1.1 else 'NOT met'} "
          f"(worst {worst:.3f}x); {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("zo", help="peak memory of a zeroth-order step vs inference vs AdamW fine-tuning")
    p.add_argument("--sizes", default="tiny,small,medium", help="comma-separated: tiny, small, medium")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--optimizer", default="zo_sgd", help="a zeroth-order recipe (default zo_sgd)")
    p.add_argument("-n", type=int, default=1, help="perturbations per step (default 1)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--json", help="also write the rows as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p.set_defaults(func=cmd_zo)
