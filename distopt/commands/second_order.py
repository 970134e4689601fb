"""``distopt bench second-order``: amortized step time of Shampoo / SOAP / Muon relative to AdamW.

    distopt bench second-order [--optimizers shampoo,soap,muon] [--scale 0.25] [--layers 12]
                               [--device cpu|cuda] [--precondition-frequency 10] [--repeats 5]
                               [--threads N] [--clock wall|process] [--vocab V]

Prints one row per optimizer (and torch.optim.Muon beside distopt's muon): ms per step averaged
over two precondition periods, and the ratio to distopt AdamW on the same GPT-like parameters
(see :mod:`distopt.bench.second_order_step`).
"""
from __future__ import annotations

import argparse
import sys
import time


def cmd_second_order(args: argparse.Namespace) -> int:
    import torch

    import distopt
    from distopt.bench import second_order_step as sos
    from distopt.bench.table import render_table

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.device == "cuda" and args.clock == "process":
        print("error: --clock process measures CPU time, not GPU work; use --clock wall with cuda", file=sys.stderr)
        return 2
    wanted = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    known = set(distopt.available())
    for n in wanted:
        if n not in known:
            print(f"note: skipped {n!r}: not in the registry")
    names = [n for n in wanted if n in known]
    shapes = sos.gpt_shapes(args.scale, layers=args.layers, vocab=args.vocab)
    old_threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        rows = sos.bench_second_order(names, shapes, args.repeats, args.device, args.precondition_frequency,
                                      progress=None if args.quiet else lambda s: print(s, file=sys.stderr),
                                      clock=args.clock)
    finally:
        torch.set_num_threads(old_threads)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    table = [(r["optimizer"], r["impl"], fmt(r["ms_per_step"], ".2f"), fmt(r["ratio_vs_adamw"], ".2f"))
             for r in rows]
    title = (f"step() time amortized over {2 * args.precondition_frequency} steps (precondition_frequency="
             f"{args.precondition_frequency}), GPT-like {args.layers} layers, width "
             f"{sos.gpt_shapes(args.scale, 1)[0][0]}, {sos.describe(shapes)}, {args.device}, "
             f"median of {args.repeats}, {args.clock} clock")
    render_table(("optimizer", "implementation", "ms/step", "x AdamW"), table, title=title, plain=args.plain)
    for r in rows:
        if r["error"]:
            print(f"note: {r['optimizer']} ({r['impl']}) not timed: {r['error']}")
    print(f"(x AdamW = t / t_adamw, distopt AdamW foreach as the baseline; {time.perf_counter() - start:.1f} s)")
    return 0 if all(r["error"] is None for r in rows) else 1


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("second-order", help="amortized step time of shampoo/soap/muon vs AdamW")
    p.add_argument("--optimizers", default="shampoo,soap,muon",
                   help="comma-separated names (default shampoo,soap,muon)")
    p.add_argument("--scale", type=float, default=1.0, help="width multiplier of the 768-wide model (default 1)")
    p.add_argument("--layers", type=int, default=12, help="transformer layers (default 12)")
    p.add_argument("--vocab", type=int, default=0, help="add a (vocab, width) embedding (default 0: none)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precondition-frequency", type=int, default=10, help="root / basis refresh period (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per candidate (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--clock", default="wall", choices=("wall", "process"),
                   help="wall time (default) or this process's CPU time (steadier on a shared CPU; not for cuda)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p.set_defaults(func=cmd_second_order)
