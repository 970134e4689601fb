"""``distopt bench dp``: what differential privacy costs on the digits MLP.

1. Cost: time per training iteration (forward + backward + step, median) and peak memory of
   non-private training next to Opacus DP-SGD with per-sample gradients (``hooks``) and with
   ghost clipping (``ghost``), as ratios to non-private. On CPU each configuration runs in a
   fresh process (spawned) and its peak is ``ru_maxrss`` during training minus the resident size
   before training; on CUDA it is ``torch.cuda.max_memory_allocated``.
2. Utility: test accuracy at ε ∈ {1, 3, 8} (δ = 1e-5, PRV accountant, σ from Opacus'
   ``get_noise_multiplier`` for the planned epochs, Poisson sampling) for adamw, adamw with
   DP-AdamBC bias correction, lion, muon, shampoo (when registered) and DP-ZO (the ``zo_sgd``
   recipe with its scalar privatized; batch 16 and 3x the epochs, since a two-point step carries
   one scalar), next to each one's non-private
   accuracy. Each cell is the best of a small learning-rate grid, chosen on a validation split
   held out from the training split (the test split is only used for the reported number).
"""
from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import distopt
from distopt.bench.table import render_table
from distopt.bench.workloads import Dataset, build_mlp, load_digits_split

EPSILONS = (1.0, 3.0, 8.0)
DELTA = 1e-5
LR_FACTORS = (0.3, 1.0, 3.0)


@dataclass(frozen=True)
class Contender:
    """One row of the utility table: a recipe, its base lr, and how it is privatized."""

    label: str
    optimizer: str
    lr: float
    hparams: dict[str, Any] = field(default_factory=dict)
    bias_correction: bool = False
    zeroth_order: bool = False
    reference: str | None = None  # the row whose non-private accuracy this one is compared with
    batch_size: int | None = None  # None: Settings.batch_size
    epochs_factor: int = 1
    lr_factors: tuple[float, ...] | None = None  # None: Settings.lr_factors


def contenders() -> list[Contender]:
    rows = [
        Contender("adamw", "adamw", 1e-2),
        # DP-AdamBC divides by sqrt(max(v̂ - Φ, γ')) ≪ sqrt(v̂): it wants a smaller lr (the paper's: 5e-6..1e-4)
        Contender("adamw+bc", "adamw", 6e-5, bias_correction=True, reference="adamw"),
        Contender("lion", "lion", 3e-3),
        Contender("muon", "muon", 6e-2),
    ]
    if "shampoo" in distopt.available():
        rows.append(Contender("shampoo", "shampoo", 1e-2))
    # a two-point step costs two forward passes and carries one scalar: many small steps (batch 16, 3x the
    # epochs, so more noise for the same ε); measured on this workload, 90 steps stay at chance
    zo = "zo_sgd" if "zo_sgd" in distopt.available() else "sgd"  # a distopt.zo recipe, else ZO-SGD via p.grad
    # without clipping the non-private ZO reference diverges above ~3e-3 (measured): its grid reaches lower
    rows.append(Contender(f"dp-zo ({zo})", zo, 9e-3, zeroth_order=True, batch_size=16, epochs_factor=3,
                          lr_factors=(0.1, 0.3, 1.0)))
    return [r for r in rows if r.optimizer in distopt.available()]


@dataclass
class Settings:
    epochs: int = 10
    batch_size: int = 128
    max_grad_norm: float = 1.0
    seeds: int = 1
    lr_factors: tuple[float, ...] = LR_FACTORS
    cost_steps: int = 30
    device: str = "cpu"
    threads: int = 1
    grad_sample_mode: str = "ghost"  # accuracy runs: same clipped gradients as hooks, ~9x faster here


# ------------------------------------------------------------------------------------------ training
def _split_validation(data: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, tuple]:
    """Hold out a validation part of the training split (fixed seed) for choosing the lr."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.y_train), generator=g)
    n_val = int(len(perm) * fraction)
    val, train = perm[:n_val], perm[n_val:]
    return (Dataset(data.x_train[train], data.y_train[train], data.x_test, data.y_test, data.num_classes),
            (data.x_train[val], data.y_train[val]))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train_one(c: Contender, lr: float, epsilon: float | None, data: Dataset, val: tuple, s: Settings,
              seed: int) -> dict[str, Any]:
    """One training run; returns accuracies, σ, ε spent and timing."""
    from distopt.privacy import make_private, make_private_zo

    device = torch.device(s.device)
    model = build_mlp(data.num_features, data.num_classes, seed=seed).to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=c.batch_size or s.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    epochs = s.epochs * c.epochs_factor
    opt = distopt.create(c.optimizer, model.parameters(), lr=lr, **c.hparams)
    sigma, private, criterion = 0.0, opt, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if epsilon is not None and c.zeroth_order:
            model, private, loader = make_private_zo(
                model, opt, loader, target_epsilon=epsilon, target_delta=DELTA, epochs=epochs,
                max_grad_norm=s.max_grad_norm, noise_generator=torch.Generator(device=device).manual_seed(seed),
                seed=seed)
            sigma = private.noise_multiplier
        elif epsilon is not None:
            out = make_private(
                model, opt, loader, target_epsilon=epsilon, target_delta=DELTA, epochs=epochs,
                max_grad_norm=s.max_grad_norm, bias_correction=c.bias_correction, grad_sample_mode=s.grad_sample_mode,
                noise_generator=torch.Generator(device=device).manual_seed(seed))
            model, private, loader = out[0], out[1], out[-1]
            criterion = out[2] if s.grad_sample_mode == "ghost" else None
            sigma = private.noise_multiplier
    plain_zo = c.zeroth_order and epsilon is None
    native_zo = getattr(type(opt), "closure_kind", "backward") == "forward"
    if plain_zo and not native_zo:  # the non-private reference of DP-ZO: the estimator without clipping or noise
        from distopt.privacy.zo import TwoPointEstimator

        estimator = TwoPointEstimator([p for p in model.parameters()], 1e-3)
    start = time.perf_counter()
    steps = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            for xb, yb in loader:
                if len(xb) == 0:  # an empty Poisson batch: nothing to learn from
                    continue
                if c.zeroth_order and epsilon is not None:
                    private.step(lambda: nn.functional.cross_entropy(model(xb), yb, reduction="none"))
                elif plain_zo and native_zo:
                    opt.step(lambda: nn.functional.cross_entropy(model(xb), yb))
                elif plain_zo:
                    seed_t = seed * 1_000_003 + steps
                    g, _ = estimator.per_example_scalars(
                        lambda: nn.functional.cross_entropy(model(xb), yb, reduction="none"), seed_t)
                    with torch.no_grad():
                        for p, z in zip(estimator.params, estimator.directions(seed_t)):
                            p.grad = z * g.mean()
                    opt.step()
                else:
                    private.zero_grad()
                    logits = model(xb)
                    (criterion(logits, yb) if criterion else nn.functional.cross_entropy(logits, yb)).backward()
                    private.step()
                steps += 1
    wall = time.perf_counter() - start
    module = model._module if hasattr(model, "_module") else model
    if not all(torch.isfinite(p).all() for p in module.parameters()):
        val_acc = test_acc = float("nan")
    else:
        val_acc = _accuracy(module, val[0].to(device), val[1].to(device))
        test_acc = _accuracy(module, data.x_test.to(device), data.y_test.to(device))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps_spent = private.privacy_spent()[0] if epsilon is not None else 0.0
    return {"label": c.label, "optimizer": c.optimizer, "lr": lr, "epsilon": epsilon, "seed": seed, "sigma": sigma,
            "epsilon_spent": eps_spent, "val_acc": val_acc, "test_acc": test_acc, "steps": steps, "wall_s": wall}


def utility(s: Settings, progress: bool = True) -> list[dict[str, Any]]:
    data, val = _split_validation(load_digits_split())
    records = []
    for c in contenders():
        for epsilon in (None, *EPSILONS) if c.reference is None else EPSILONS:
            for factor in (c.lr_factors or s.lr_factors) if len(s.lr_factors) > 1 else s.lr_factors:
                lr = float(f"{c.lr * factor:.3g}")
                for seed in range(s.seeds):
                    if progress:
                        print(f"  {c.label:<12} ε={epsilon if epsilon else '∞':<4} lr={lr:<8g} seed={seed}",
                              file=sys.stderr)
                    records.append(train_one(c, lr, epsilon, data, val, s, seed))
    return records


def best_cells(records: list[dict[str, Any]]) -> dict[tuple[str, float | None], dict[str, Any]]:
    """Per (label, ε): the lr with the best mean validation accuracy; its test accuracy mean ± std."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["label"], r["epsilon"], r["lr"]), []).append(r)
    best: dict[tuple[str, float | None], dict[str, Any]] = {}
    for (label, eps, lr), runs in groups.items():
        vals = [r["val_acc"] for r in runs]
        val = statistics.fmean(vals) if not any(math.isnan(v) for v in vals) else -1.0
        tests = [r["test_acc"] for r in runs]
        cell = {"lr": lr, "val": val, "test": statistics.fmean(tests),
                "std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "sigma": runs[0]["sigma"],
                "eps_spent": max(r["epsilon_spent"] for r in runs)}
        if (label, eps) not in best or val > best[(label, eps)]["val"]:
            best[(label, eps)] = cell
    return best


# ------------------------------------------------------------------------------------------ cost
def _cost_worker(mode: str, s: Settings) -> dict[str, Any]:
    """Time and peak memory of ``s.cost_steps`` iterations of adamw, non-private or private (mode)."""
    torch.set_num_threads(s.threads)
    warnings.simplefilter("ignore")
    from distopt.privacy import make_private

    device = torch.device(s.device)
    data = load_digits_split()
    model = build_mlp(data.num_features, data.num_classes, seed=0).to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    loader = DataLoader(TensorDataset(x, y), batch_size=s.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = distopt.create("adamw", model.parameters(), lr=1e-3)
    criterion = None
    if mode != "non-private":
        out = make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=s.max_grad_norm,
                           grad_sample_mode=mode, poisson_sampling=False)
        model, opt, loader = out[0], out[1], out[-1]
        criterion = out[2] if mode == "ghost" else None
    batches = [(xb, yb) for xb, yb in loader]

    def iteration(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        logits = model(xb)
        (criterion(logits, yb) if criterion is not None else nn.functional.cross_entropy(logits, yb)).backward()
        opt.step()

    iteration(*batches[0])  # warm-up (allocator, lazy state)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for i in range(s.cost_steps):
        xb, yb = batches[(i + 1) % len(batches)]
        t0 = time.perf_counter()
        iteration(xb, yb)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    n_params = sum(p.numel() for p in (model._module if hasattr(model, "_module") else model).parameters())
    return {"mode": mode, "step_ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20,
            "params": n_params, "batch_size": s.batch_size}


def cost(s: Settings, modes: tuple[str, ...] = ("non-private", "hooks", "ghost")) -> list[dict[str, Any]]:
    rows = []
    if s.device == "cuda":  # one process is enough: the CUDA allocator's peak can be reset
        return [_cost_worker(m, s) for m in modes]
    for mode in modes:  # a fresh process each, so that ru_maxrss is this configuration's peak
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            rows.append(pool.submit(_cost_worker, mode, s).result())
    return rows


# ------------------------------------------------------------------------------------------ report
def print_cost(rows: list[dict[str, Any]], plain: bool = False) -> None:
    base = rows[0]
    table = []
    for r in rows:
        table.append([r["mode"], f"{r['step_ms']:.2f}", f"{r['step_ms'] / base['step_ms']:.2f}x",
                      f"{r['peak_mb']:.1f}", f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base["peak_mb"] > 0 else "-"])
    title = (f"cost of DP-SGD: adamw on the digits MLP ({base['params']} params), batch {base['batch_size']}, "
             f"median iteration (forward+backward+step) and peak memory above the pre-training level")
    render_table(["mode", "iter ms", "time vs non-private", "peak MB", "memory vs non-private"], table, title,
                 plain=plain)


def print_utility(best: dict, plain: bool = False) -> None:
    labels = list(dict.fromkeys(label for label, _ in best))
    refs = {c.label: c.reference or c.label for c in contenders()}
    fmt = lambda cell: ("-" if cell is None or math.isnan(cell["test"]) else  # noqa: E731
                        f"{100 * cell['test']:.1f}" + (f" ± {100 * cell['std']:.1f}" if cell["std"] else ""))
    table = []
    for label in labels:
        ref = refs.get(label, label)
        np_acc = best.get((ref, None))
        row: list[Any] = [label, fmt(np_acc) + ("" if ref == label else f" ({ref})")]
        row += [fmt(best.get((label, eps))) for eps in EPSILONS]
        for eps in EPSILONS:
            cell = best.get((label, eps))
            ok = cell and np_acc and not math.isnan(cell["test"]) and np_acc["test"] > 0
            row.append(f"{cell['test'] / np_acc['test']:.2f}" if ok else "-")
        table.append(row)
    cols = ["optimizer", "non-private", *[f"ε={e:g}" for e in EPSILONS], *[f"ratio ε={e:g}" for e in EPSILONS]]
    render_table(cols, table, "test accuracy % (best lr on validation); ratio = private / non-private", plain=plain)
    sig = sorted({(label, eps, round(c["sigma"], 3)) for (label, eps), c in best.items() if eps is not None},
                 key=lambda t: (t[0] != labels[0], t[0], t[1]))
    by_q: dict[float, list[str]] = {}
    for label, eps, sigma in sig:
        by_q.setdefault(label, []).append(f"ε={eps:g}: σ={sigma:g}")
    print("noise multipliers (PRV, δ=1e-5): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_q.items()
                                                            if k == labels[0] or k.startswith("dp-zo")))
    print("chosen lr (non-private, ε=1, 3, 8): " + "; ".join(
        f"{label} " + ",".join(f"{best[(label, e)]['lr']:g}" for e in (None, *EPSILONS) if (label, e) in best)
        for label in labels))


def run(args: Any) -> int:
    s = Settings(epochs=args.epochs, batch_size=args.batch_size, max_grad_norm=args.max_grad_norm, seeds=args.seeds,
                 device=args.device, threads=args.threads, cost_steps=args.cost_steps, grad_sample_mode=args.mode)
    if args.quick:
        s.epochs, s.seeds, s.lr_factors, s.cost_steps = min(s.epochs, 3), 1, (1.0,), min(s.cost_steps, 10)
    if s.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    start = time.perf_counter()
    try:
        cost_rows = cost(s) if not args.skip_cost else []
        records = utility(s, progress=not args.no_progress) if not args.skip_accuracy else []
    finally:
        torch.set_num_threads(old_threads)
    if cost_rows:
        print_cost(cost_rows, plain=args.plain)
    best = best_cells(records)
    if records:
        print_utility(best, plain=args.plain)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dp_results.jsonl", "w") as f:
        for r in cost_rows:
            f.write(json.dumps({"kind": "cost", **r}) + "\n")
        for r in records:
            f.write(json.dumps({"kind": "accuracy", **r}) + "\n")
        f.write(json.dumps({"kind": "settings", **asdict(s)}) + "\n")
    print(f"{len(records)} training runs + {len(cost_rows)} cost runs in {time.perf_counter() - start:.1f} s "
          f"(epochs={s.epochs}, batch={s.batch_size}, C={s.max_grad_norm}, threads={s.threads}, {s.device}); "
          f"wrote {out / 'dp_results.jsonl'}")
    return 0 if all(not math.isnan(r["test_acc"]) for r in records) else 1
