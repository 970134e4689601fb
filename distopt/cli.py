"""The ``distopt`` command line.

    distopt list [--family F] [--json]     the catalogue: stages, locality, state bytes/param
    distopt bench [--suite default|full|survey] ...   tune, evaluate over seeds, report (see distopt.bench)
    distopt bench report DIR               re-render report.md and plots from saved results
    distopt bench ablation                 P x Φ operator ablation on the LM workload
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

DEFAULT_SUITE = ("adamw", "sgd", "lion", "lamb", "adafactor", "muon")
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


DEFAULT_WORKLOADS = ("cnn_digits", "llama_char")
SUITES = ("default", "full", "survey")


def _suite_optimizers(args: argparse.Namespace, notes: list[str]) -> list[str]:
    """The optimizers of the suite (AdamW always included: it defines the target)."""
    from distopt.bench.search_space import SURVEY_OPTIMIZERS

    if args.optimizers:
        names = _names(args.optimizers, (), notes)
    elif args.suite == "survey":
        known = set(distopt.available())
        names = []
        for timm_name, name in SURVEY_OPTIMIZERS.items():
            if name in known:
                names.append(name)
            else:
                notes.append(f"skipped survey optimizer {timm_name!r} (distopt name {name!r}): not registered yet")
    elif args.suite == "full":
        names = distopt.available()
    else:
        names = _names(None, DEFAULT_SUITE, notes)
    if "adamw" not in names:
        names = ["adamw", *names]
        notes.append("added adamw: it defines the target of steps- and time-to-target")
    return list(dict.fromkeys(names))


def _jobs(jobs: int, device: str) -> int:
    """``--jobs 0``: one process per CPU core on CPU (each run single-threaded), one on CUDA."""
    import os

    if jobs > 0:
        return jobs
    return 1 if device.startswith("cuda") else max(1, os.cpu_count() or 1)


def _suite_settings(args: argparse.Namespace, notes: list[str]):  # -> protocol.SuiteSettings
    from distopt.bench import protocol, search_space, workloads

    names = _suite_optimizers(args, notes)
    if args.workloads:
        wls = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in wls if w not in workloads.all_workload_names()]
        if unknown:
            raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(workloads.all_workload_names())}")
    elif args.suite == "default":
        wls = list(DEFAULT_WORKLOADS) + (["llama_60m"] if args.device.startswith("cuda") else [])
    else:
        wls = list(workloads.workload_names(args.device))
    big = args.suite != "default"
    s = protocol.SuiteSettings(
        suite=args.suite + (" (quick)" if args.quick else ""), optimizers=names, workloads=wls,
        seeds=args.seeds if args.seeds is not None else 3,
        grid=None if big else search_space.SHORT_GRID,
        sensitivity=search_space.SENSITIVITY_FACTORS if big else (0.5, 1.0, 2.0),
        horizon=args.horizon if args.horizon is not None else 3,
        horizon_seeds=args.horizon_seeds if args.horizon_seeds is not None else (3 if big else 1),
        self_tuning=not args.no_self_tuning, device=args.device, quick=args.quick, data=args.data,
        budget_scale=args.budget_scale, jobs=_jobs(args.jobs, args.device), threads=args.threads, notes=notes)
    if args.quick:
        s.seeds = args.seeds if args.seeds is not None else 2
        s.grid, s.sensitivity, s.horizon, s.self_tuning = (1.0,), (), 0, False
    if args.grid:
        s.grid = tuple(float(x) for x in args.grid.split(",") if x.strip())
    return s


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from distopt.bench import protocol, report, runner

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    notes: list[str] = []
    try:
        settings = _suite_settings(args, notes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = runner.Cache(None if args.no_cache else (args.cache or out / "cache"))
    start = time.perf_counter()
    try:
        records, summary = protocol.run_protocol(settings, cache, progress=not args.no_progress, limit=args.max_runs)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # e.g. a --data path that does not exist
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - start
    if not summary["complete"]:
        notes.append("incomplete: the suite stopped early (--max-runs); run the same command again to resume")
    env = {**runner.environment(args.device), "threads": settings.threads, "jobs": settings.jobs}
    meta = {"settings": settings.to_json(), "environment": env, "notes": [],
            "counts": summary["counts"], "tuned": summary["tuned"], "complete": summary["complete"], "wall_s": wall}
    written = _write_bench(records, out, meta, args.plain)
    for n in notes:
        print(f"note: {n}")
    ran = sum(c["ran"] for c in summary["counts"].values())
    cached = sum(c["cached"] for c in summary["counts"].values())
    print(f"{ran + cached} runs ({ran} run now, {cached} from the cache) in {wall:.1f} s; "
          f"wrote {', '.join(map(str, written))}")
    failed = [r for r in records if r.get("error")]
    for r in failed[:10]:
        print(f"note: {r['config']['optimizer']} on {r['config']['workload']} lr={r['config']['lr']:g} failed: {r['error']}")
    return 0 if records and not failed else 1


def _write_bench(records: list, out: Path, meta: dict, plain: bool) -> list[Path]:
    """Write results.jsonl and suite.json, print the ranked tables, write report.md and the plots."""
    from distopt.bench import report

    out.mkdir(parents=True, exist_ok=True)
    report.write_jsonl(records, out / "results.jsonl")
    (out / "suite.json").write_text(json.dumps(report._clean(meta), indent=2, default=str), encoding="utf-8")
    _, files = report.render(records, out, meta, plain=plain)
    return [out / "results.jsonl", out / "suite.json"] + files


def cmd_bench_report(args: argparse.Namespace) -> int:
    from distopt.bench import report

    try:
        _, files = report.render_dir(Path(args.results_dir), plain=args.plain)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(map(str, files))}")
    return 0


def cmd_bench_ablation(args: argparse.Namespace) -> int:
    from distopt.bench import ablation, runner

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = runner.Cache(None if args.no_cache else (args.cache or out / "cache"))
    start = time.perf_counter()
    result = ablation.run(workload=args.workload, seeds=args.seeds, grid=tuple(float(x) for x in args.grid.split(",")),
                          quick=args.quick, budget_scale=args.budget_scale, cache=cache, jobs=_jobs(args.jobs, "cpu"),
                          threads=args.threads, progress=not args.no_progress)
    files = ablation.write(result, out, plain=args.plain)
    for n in result["notes"]:
        print(f"note: {n}")
    print(f"{result['counts']} in {time.perf_counter() - start:.1f} s; wrote {', '.join(map(str, files))}")
    return 0


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

    p_bench = sub.add_parser("bench", help="benchmark suites (`bench report`, `bench ablation`, `bench step`, ...)",
                             description="The survey's evaluation made rigorous: equal lr-tuning budget, several "
                                         "seeds with bootstrap CIs, steps/time-to-target vs tuned AdamW, lr "
                                         "sensitivity, self-tuning track, memory and step overhead.")
    p_bench.add_argument("--suite", choices=SUITES, default="default",
                         help="default: 6 optimizers x cnn_digits, llama_char (CPU minutes); full: every registered "
                              "optimizer x every workload; survey: the survey's 23 optimizers (timm names)")
    p_bench.add_argument("--optimizers", help=f"comma-separated names (default suite: {','.join(DEFAULT_SUITE)})")
    p_bench.add_argument("--workloads", help=f"comma-separated workloads (default suite: {','.join(DEFAULT_WORKLOADS)})")
    p_bench.add_argument("--device", default="cpu", help="cpu or cuda[:N]; cuda scales the workloads up")
    p_bench.add_argument("--data", help="data path for workloads that need one (ImageNet root, token file)")
    p_bench.add_argument("--seeds", type=int, help="evaluation seeds (default 3)")
    p_bench.add_argument("--grid", help="lr factors around each base lr, e.g. 0.1,0.2,1,5,10 "
                                        "(default: 0.2,1,5; full/survey: each optimizer's declared grid)")
    p_bench.add_argument("--horizon", type=int, help="long-horizon multiple of the budget (default 3; 0: off)")
    p_bench.add_argument("--horizon-seeds", type=int, help="seeds of the long-horizon runs (default 1; full: 3)")
    p_bench.add_argument("--no-self-tuning", action="store_true", help="skip the self-tuning track")
    p_bench.add_argument("--budget-scale", type=float, default=1.0, help="multiply every workload's step budget")
    p_bench.add_argument("--jobs", type=int, default=0,
                         help="runs in parallel processes, one thread each (default 0: one per CPU core on CPU, 1 on CUDA)")
    p_bench.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p_bench.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    p_bench.add_argument("--cache", help="results cache directory (default OUT/cache)")
    p_bench.add_argument("--no-cache", action="store_true", help="neither read nor write the results cache")
    p_bench.add_argument("--max-runs", type=int, help="stop after this many new runs (resume later)")
    p_bench.add_argument("--quick", action="store_true",
                         help="smoke test: 40-step budgets, 2 seeds, base lr only, no sensitivity/horizon/self-tuning")
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

    p_report = bench_sub.add_parser("report", help="re-render report.md and plots from a results directory")
    p_report.add_argument("results_dir", help="the --out directory of a `distopt bench` run")
    p_report.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p_report.set_defaults(func=cmd_bench_report)

    p_abl = bench_sub.add_parser("ablation", help="factorial P x Φ operator ablation on the LM workload")
    p_abl.add_argument("--workload", default="llama_char", help="workload (default llama_char)")
    p_abl.add_argument("--seeds", type=int, default=1, help="seeds at each cell's tuned lr (default 1)")
    p_abl.add_argument("--grid", default="0.0625,0.25,1,4,16",
                       help="lr factors around each cell's base lr (default 0.0625,0.25,1,4,16)")
    p_abl.add_argument("--budget-scale", type=float, default=1.0, help="multiply the workload's budget (default 1)")
    p_abl.add_argument("--jobs", type=int, default=0, help="runs in parallel processes (default 0: one per CPU core)")
    p_abl.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default 1)")
    p_abl.add_argument("--out", default="bench_ablation", help="output directory (default bench_ablation/)")
    p_abl.add_argument("--cache", help="results cache directory (default OUT/cache)")
    p_abl.add_argument("--no-cache", action="store_true", help="neither read nor write the results cache")
    p_abl.add_argument("--quick", action="store_true", help="smoke test: 40-step budget, base lr only")
    p_abl.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_abl.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p_abl.set_defaults(func=cmd_bench_ablation)

    from distopt.commands import add_all

    add_all(sub, bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
