"""``distopt bench zo``: peak memory of a zeroth-order step vs inference vs AdamW fine-tuning.

    distopt bench zo [--sizes tiny,small,medium] [--batch 4] [--seq 128] [--device cpu|cuda]
                     [--optimizer zo_sgd] [-n 1] [--threads N] [--json PATH] [--plain]

    distopt bench zo --convergence [--methods adamw,zo_sgd,zo_adam] [--lrs zo_sgd=3e-4,1e-3,3e-3]
                     [--steps 100] [--zo-steps 1000] [--evals 100] [--target-fraction 0.8] [--seeds 1]
                     [--hidden 64] [--layers 2] [--length 24] [--batch 16] [--eps 1e-3] [--out DIR]

Memory (default): one row per model size (LLaMA-architecture causal LM from a config, random
init): model MB, peak MB of a forward pass, of a ZO step (on_use and in_place perturbation), of an AdamW
fine-tuning step (forward + backward + step), the ratios to inference, and the bytes a
data-parallel step communicates (DP-ZO: 8·n; DDP AdamW: 4·params). See
:mod:`distopt.bench.zo_memory` for how memory is measured on CPU (exact live-tensor bytes).

``--convergence``: steps, forward-equivalents and training time to a target held-out loss on the
task of ``examples/zo_finetune_llm.py``, AdamW vs zeroth-order recipes, each at its best lr of a
small grid; a table with the ratios ZO/AdamW, ``zo_convergence.json`` and (with matplotlib)
``zo_convergence.png`` under ``--out``. The rule is in :mod:`distopt.bench.zo_convergence`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time


def cmd_zo(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if args.convergence:
        return cmd_zo_convergence(args)
    return cmd_zo_memory(args)


def cmd_zo_memory(args: argparse.Namespace) -> int:
    from distopt.bench.table import render_table
    from distopt.bench.zo_memory import SIZES, bench_zo_memory

    args.batch = 4 if args.batch is None else args.batch
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        print(f"error: unknown size(s) {unknown}; choose from {', '.join(SIZES)}", file=sys.stderr)
        return 2
    from distopt.cli import _threads

    start = time.perf_counter()
    with _threads(args.threads):
        rows = bench_zo_memory(sizes, args.batch, args.seq, args.device, args.optimizer, args.n,
                               progress=None if args.quiet else lambda s: print(s, file=sys.stderr))
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


def _parse_lrs(items: list[str]) -> dict[str, tuple[float, ...]]:
    out = {}
    for item in items:
        method, _, values = item.partition("=")
        try:
            out[method.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--lrs must look like METHOD=LR,LR,... (e.g. zo_sgd=3e-4,1e-3), got {item!r}") from None
        if not method.strip() or not out[method.strip()]:
            raise ValueError(f"--lrs must look like METHOD=LR,LR,... (e.g. zo_sgd=3e-4,1e-3), got {item!r}")
    return out


def _fmt(value: float | None, spec: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, spec)


def cmd_zo_convergence(args: argparse.Namespace) -> int:
    from distopt.bench.table import render_table
    from distopt.bench.zo_convergence import ConvergenceConfig, bench_zo_convergence, check_config, write_outputs

    try:
        cfg = ConvergenceConfig(
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), lrs=_parse_lrs(args.lrs),
            steps=args.steps, zo_steps=args.zo_steps, evals=args.evals, target_fraction=args.target_fraction,
            seeds=args.seeds, hidden=args.hidden, layers=args.layers, length=args.length,
            batch=16 if args.batch is None else args.batch, eps=args.eps, n=args.n, device=args.device)
        check_config(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from distopt.cli import _threads

    start = time.perf_counter()
    with _threads(args.threads):
        result = bench_zo_convergence(cfg, progress=None if args.quiet else lambda s: print(s, file=sys.stderr))
    best = {(r["method"], r["lr"]) for r in result["summary"]}
    render_table(
        ("method", "lr", "best", "reached", "final loss", "min loss", "eval every", "steps", "fwd-eq", "train s"),
        [(c["method"], f"{c['lr']:g}", "*" if (c["method"], c["lr"]) in best else "", f"{c['reached']}/{c['seeds']}",
          "diverged" if math.isnan(c["final_loss"]) else f"{c['final_loss']:.4f}",
          f"{c['min_loss']:.4f}", c["eval_every"], _fmt(c["steps_to_target"], ".0f"),
          _fmt(c["forward_to_target"], ".0f"), _fmt(c["seconds_to_target"], ".3g")) for c in result["grid"]],
        title=f"to target, every lr (median over {cfg.seeds} seed(s); steps / fwd-eq / train s to target)",
        plain=args.plain)
    params = result["runs"][0]["params"]
    render_table(
        ("method", "best lr", "steps", "fwd-eq", "train s", "steps ZO/AdamW", "fwd-eq ZO/AdamW", "time ZO/AdamW"),
        [(r["method"], f"{r['lr']:g}", _fmt(r["steps_to_target"], ".0f"), _fmt(r["forward_to_target"], ".0f"),
          _fmt(r["seconds_to_target"], ".3g"), _fmt(r["steps_ratio"], ".1f", "-"), _fmt(r["forward_ratio"], ".1f", "-"),
          _fmt(r["seconds_ratio"], ".1f", "-")) for r in result["summary"]],
        title=(f"steps-to-target, best lr per method; LLaMA {cfg.layers}x{cfg.hidden} ({params / 1e6:.3f}M params), "
               f"batch {cfg.batch} x {cfg.length}, {cfg.device}; AdamW {cfg.steps} steps, ZO {cfg.zo_steps} steps, "
               f"eps {cfg.eps:g}, n {cfg.n}"), plain=args.plain)
    targets = ", ".join(f"seed {s}: {t:.4f}" for s, t in result["targets"].items())
    print(f"{result['rule']} ({targets}); {time.perf_counter() - start:.1f} s")
    files = write_outputs(result, args.out)
    if args.json:
        import shutil
        shutil.copyfile(files[0], args.json)
    print("wrote " + ", ".join(str(f) for f in files + ([args.json] if args.json else [])))
    return 0


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p = bench.add_parser("zo", help="peak memory of a zeroth-order step vs inference vs AdamW fine-tuning; "
                                    "--convergence: steps-to-target vs AdamW")
    p.add_argument("--sizes", default="tiny,small,medium", help="memory: comma-separated: tiny, small, medium")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: memory 4, convergence 16)")
    p.add_argument("--seq", type=int, default=128, help="memory: tokens per row")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--optimizer", default="zo_sgd", help="memory: a zeroth-order recipe (default zo_sgd)")
    p.add_argument("-n", type=int, default=1, help="perturbations per step (default 1)")
    c = p.add_argument_group("convergence (steps-to-target vs AdamW on the examples/zo_finetune_llm.py task)")
    c.add_argument("--convergence", action="store_true", help="run the convergence benchmark instead of memory")
    c.add_argument("--methods", default="adamw,zo_sgd,zo_adam", help="adamw and zeroth-order recipes, comma-separated")
    c.add_argument("--lrs", action="append", default=[], metavar="METHOD=LR,LR",
                   help="lr grid of a method (repeatable; defaults in distopt.bench.zo_convergence.DEFAULT_LRS)")
    c.add_argument("--steps", type=int, default=100, help="AdamW step budget (default 100)")
    c.add_argument("--zo-steps", type=int, default=1000, help="step budget of each ZO recipe (default 1000)")
    c.add_argument("--evals", type=int, default=100, help="held-out evaluations per run (every budget//evals steps)")
    c.add_argument("--target-fraction", type=float, default=0.8,
                   help="target = this x the initial held-out loss (default 0.8)")
    c.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (text, init, batches, directions)")
    c.add_argument("--hidden", type=int, default=64)
    c.add_argument("--layers", type=int, default=2)
    c.add_argument("--length", type=int, default=24, help="tokens per example")
    c.add_argument("--eps", type=float, default=1e-3, help="ZO perturbation scale")
    c.add_argument("--out", default="zo_convergence_out", help="directory for zo_convergence.json / .png")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")
    p.add_argument("--json", help="also write the rows (convergence: the result) as JSON to this path")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--plain", action="store_true", help="plain text table even if rich is installed")
    p.set_defaults(func=cmd_zo)
