"""``distopt bench shard``: ownership-plan balance on GPT-2 small / Llama-3.2-1B shapes for
N = 2, 8, 64 (adamw, muon, shampoo-like cost), then the ZeroOptimizer's per-rank state bytes and
communication bytes per step measured with real processes (torchrun, gloo, CPU).

    distopt bench shard                        planner table + measurement (GPT-2 small, 2 ranks)
    distopt bench shard --no-measure           planner table only (well under a second)
    distopt bench shard --layers 2 --recipes adamw,muon --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def cmd_shard(args: argparse.Namespace) -> int:
    from distopt.distributed import bench

    start = time.perf_counter()
    worlds = tuple(int(x) for x in args.world_sizes.split(","))
    rows = bench.planner_rows(world_sizes=worlds)
    bench.print_planner(rows, plain=args.plain)
    out: dict = {"planner": rows}
    for r in rows:
        if not r["load ok (<=1.1)"] and r["lower bound"] > 1.1:
            print(f"note: {r['model']} {r['recipe']} N={r['N']}: {r['units']} whole-matrix units cannot balance "
                  f"{r['N']} ranks better than {r['lower bound']:.3f} (largest unit / mean load)")
    if not args.no_measure:
        print(f"measuring with {args.nproc} processes (torchrun, gloo) ...", flush=True)
        report, cmd = bench.measure(args.model, args.layers, args.nproc, args.recipes)
        mrows = bench.measured_rows(report)
        bench.print_measured(report, mrows, plain=args.plain)
        for name, r in report["recipes"].items():
            if "skipped" in r:
                print(f"note: {name}: {r['skipped']}")
        print("params out = payload of the collectives that return updated params, per rank per step: an "
              "all-gather of N x the longest share (padding included) or, when shares are unequal, one broadcast "
              "per owner (exact bytes); flags = the 'has grad' MAX all-reduce (1 B/param); DDP's own gradient "
              "all-reduce (= param bytes) comes on top, unchanged")
        print("command: " + " ".join(cmd[:1] + ["-m"] + cmd[2:-2] + ["--out", "<tmp>.json"]))
        out.update(measured=mrows, report=report)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("shard", help="sharded-state plan balance and measured ZeRO bytes")
    p.add_argument("--world-sizes", default="2,8,64", help="planner world sizes (default 2,8,64)")
    p.add_argument("--no-measure", action="store_true", help="planner table only")
    p.add_argument("--model", default="gpt2-small", choices=["gpt2-small", "llama-1b"],
                   help="shapes for the measurement (default gpt2-small)")
    p.add_argument("--layers", type=int, default=0, help="transformer layers for the measurement (0: all)")
    p.add_argument("--nproc", type=int, default=2, help="processes for the measurement (default 2)")
    p.add_argument("--recipes", default="adamw,muon,lamb,adafactor", help="recipes to measure")
    p.add_argument("--json", default=None, help="also write the tables as JSON")
    p.add_argument("--plain", action="store_true", help="plain text tables even if rich is installed")
    p.set_defaults(func=cmd_shard)
