"""The ``distopt`` command line.

    distopt list [--family F] [--json]     the catalogue: stages, locality, state bytes/param
    distopt bench [--optimizers a,b] ...   the default suite: MLP on digits, lr grid x seeds
    distopt bench step [--size N] ...      step() time next to torch.optim (foreach, fused)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import distopt
from distopt.core.registry import FAMILIES

DEFAULT_SUITE = ("sgd", "adam", "adamw", "lion", "lamb", "adafactor")
DEFAULT_STEP = ("sgd", "adam", "adamw", "adagrad", "rmsprop", "lion", "lamb", "adafactor")


def _names(text: str | None, default: Sequence[str], out: list[str]) -> list[str]:
    """Names asked for (comma-separated) that are registered; a note for each that is not."""
    wanted = [n.strip().lower() for n in text.split(",") if n.strip()] if text else list(default)
    known = set(distopt.available())
    for n in wanted:
        if n not in known:
            out.append(f"skipped {n!r}: not in the registry")
    return [n for n in wanted if n in known]


def cmd_list(args: argparse.Namespace) -> int:
    from distopt.bench.catalogue import catalogue, print_catalogue

    rows = catalogue(args.family)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        print_catalogue(rows, plain=args.plain)
        for r in rows:
            if r.get("error"):
                print(f"note: {r['name']}: {r['error']}")
    return 0


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """Use ``n`` torch CPU threads (``n <= 0``: leave as is) and restore the old count after."""
    import torch

    old = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cmd_bench(args: argparse.Namespace) -> int:
    from distopt.bench import report, runner, workloads

    notes: list[str] = []
    names = _names(args.optimizers, DEFAULT_SUITE, notes)
    if args.quick:
        args.seeds, args.epochs = min(args.seeds, 1), min(args.epochs, 2)
    factors = (1.0,) if args.quick else runner.LR_FACTORS
    start = time.perf_counter()
    data = workloads.load_digits_split()
    configs = runner.build_grid(names, args.seeds, args.epochs, factors, target_loss=args.target_loss)
    with _threads(args.threads):
        if configs:  # warm up kernels and allocator so the first timed run is not penalised
            first = configs[0]
            runner.run_one(runner.RunConfig(first.optimizer, first.lr, 0, 1, hparams=first.hparams), data)
        records = runner.run_suite(configs, data, progress=not args.no_progress)
    settings = {"epochs": args.epochs, "seeds": args.seeds, "lr_factors": factors, "batch_size": 64,
                "target_loss": args.target_loss, "threads": args.threads,
                "train/test": f"{len(data.y_train)}/{len(data.y_test)}"}
    written = _write_bench(records, Path(args.out), settings, notes, args.plain)
    for n in notes:
        print(f"note: {n}")
    print(f"{len(records)} runs in {time.perf_counter() - start:.1f} s; wrote {', '.join(map(str, written))}")
    return 0 if records and not any(r.error for r in records) else 1


def _write_bench(records: list, out: Path, settings: dict, notes: list[str], plain: bool) -> list[Path]:
    """Print the results table and write results.jsonl, the plot and report.md under ``out``."""
    from distopt.bench import report

    summaries = report.summarize(records)
    report.print_results(summaries, plain=plain)
    out.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(records, out / "results.jsonl")
    plot = "loss_curves.png" if report.plot_curves(summaries, out / "loss_curves.png") else None
    if plot is None:
        notes.append('no plot: matplotlib is not installed (pip install "distopt[bench]")')
    notes += [f"{r.optimizer} lr={r.lr:g} seed={r.seed} failed: {r.error}" for r in records if r.error]
    report.write_markdown(summaries, records, out / "report.md", settings, notes, plot)
    return [out / "results.jsonl", out / "report.md"] + ([out / plot] if plot else [])


def cmd_step(args: argparse.Namespace) -> int:
    import torch

    from distopt.bench import step_time

    notes: list[str] = []
    names = _names(args.optimizers, DEFAULT_STEP, notes)
    if args.quick:
        args.size, args.repeats = min(args.size, 64), min(args.repeats, 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    start = time.perf_counter()
    progress = lambda n: print(f"timing {n} ...", file=sys.stderr)  # noqa: E731
    with _threads(args.threads):
        rows = step_time.bench_step(names, args.size, args.repeats, args.device, progress=progress)
    shapes = step_time.default_shapes(args.size)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    title = (f"step() time, {n_params / 1e6:.2f}M fp32 params in {len(shapes)} tensors on {args.device}, "
             f"median of {args.repeats} interleaved repeats")
    step_time.print_step_table(rows, title, plain=args.plain)
    for line in notes + step_time.ratio_lines(rows):
        print(line)
    print(f"(ratio = throughput distopt / torch = t_torch / t_distopt; > 1 means distopt is faster; "
          f"{time.perf_counter() - start:.1f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distopt", description="distopt: optimizers as composable operators")
    parser.add_argument("--version", action="version", version=f"distopt {distopt.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_list = sub.add_parser("list", help="the catalogue of registered optimizers")
    p_list.add_argument("--family", choices=FAMILIES, help="only this family")
    p_list.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    p_list.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p_list.set_defaults(func=cmd_list)

    p_bench = sub.add_parser("bench", help="benchmark suite (MLP on digits); `bench step` times step()")
    p_bench.add_argument("--optimizers", help=f"comma-separated names (default: {','.join(DEFAULT_SUITE)})")
    p_bench.add_argument("--seeds", type=int, default=2, help="seeds per lr (default 2)")
    p_bench.add_argument("--epochs", type=int, default=30, help="epochs per run (default 30)")
    p_bench.add_argument("--target-loss", type=float, default=0.1, help="train loss for 'steps to target'")
    p_bench.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    p_bench.add_argument("--quick", action="store_true", help="tiny run: 1 seed, 2 epochs, 1 lr")
    p_bench.add_argument("--threads", type=int, default=1,
                         help="torch CPU threads (default 1: fastest and steadiest for this small MLP)")
    p_bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_bench.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p_bench.set_defaults(func=cmd_bench)

    bench_sub = p_bench.add_subparsers(dest="bench_command")
    p_step = bench_sub.add_parser("step", help="time step() next to torch.optim foreach/fused")
    p_step.add_argument("--optimizers", help=f"comma-separated names (default: {','.join(DEFAULT_STEP)})")
    p_step.add_argument("--size", type=int, default=1024, help="N in 8x(N,N)+8x(N,)+4x(4N,N/4) (default 1024)")
    p_step.add_argument("--repeats", type=int, default=20, help="timed steps per candidate (default 20)")
    p_step.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p_step.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p_step.add_argument("--quick", action="store_true", help="tiny run: size 64, 3 repeats")
    p_step.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p_step.set_defaults(func=cmd_step)

    from distopt.commands import add_all

    add_all(sub, bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
