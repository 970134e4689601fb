"""``distopt bench dp``: cost (time, peak memory) of Opacus DP-SGD in hooks and ghost modes and of
distopt's single-backward ghost_bk next to non-private training, and test accuracy at ε ∈ {1, 3, 8}
for several recipes, DP-AdamBC and DP-ZO (work in :mod:`distopt.bench.dp`)."""
from __future__ import annotations

import argparse
import importlib.util


def cmd_dp(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("opacus") is None:
        print('error: distopt bench dp needs Opacus; install it with: pip install "distopt[dp]"')
        return 2
    from distopt.bench.dp import run

    return run(args)


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:  # noqa: ARG001
    p = bench.add_parser("dp", help="differential privacy: cost of hooks/ghost/ghost_bk clipping and accuracy at "
                                    "ε = 1, 3, 8")
    p.add_argument("--epochs", type=int, default=10, help="epochs per accuracy run (default 10)")
    p.add_argument("--batch-size", type=int, default=128, help="expected (Poisson) batch size (default 128)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping bound C (default 1.0)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per cell (default 1)")
    p.add_argument("--cost-steps", type=int, default=30, help="timed iterations per cost run (default 30)")
    p.add_argument("--cost-repeats", type=int, default=3,
                   help="fresh processes per (workload, mode) in the cost table, modes alternated (default 3)")
    p.add_argument("--mode", default="ghost", choices=("ghost", "ghost_bk", "hooks"),
                   help="per-sample clipping of the accuracy runs (default ghost: same gradients, faster)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quick", action="store_true", help="tiny run: 3 epochs, 1 seed, 1 lr, 10 timed steps")
    p.add_argument("--skip-cost", action="store_true", help="only the accuracy table")
    p.add_argument("--skip-accuracy", action="store_true", help="only the cost table")
    p.add_argument("--out", default="bench_results/dp", help="output directory (default bench_results/dp)")
    p.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    p.add_argument("--plain", action="store_true", help="plain text tables even if rich is installed")
    p.set_defaults(func=cmd_dp)
