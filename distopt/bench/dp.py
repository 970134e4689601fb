"""``distopt bench dp``: what differential privacy costs, and what accuracy it leaves.

1. Cost, on three workloads (the digits MLP, where activations dominate; a 10.0M-parameter wide
   MLP, where parameters dominate; the bench LM ``llama_char`` in its CPU configuration): time per
   adamw iteration (forward + backward + step), of its forward + backward alone (the clipping
   machinery) and of Opacus' Gaussian noise draw alone, and peak memory, for non-private training,
   Opacus with per-sample gradients (``hooks``; skipped where those would exceed 2 GiB), Opacus'
   two-pass ghost clipping (``ghost``) and distopt's single-backward book-keeping ghost clipping
   (``ghost_bk``, :mod:`distopt.privacy.book_keeping`), as ratios to non-private. Each
   (workload, mode) runs ``cost_repeats`` times, each in a fresh spawned process, the modes
   alternating (in order, then reversed) across repeats so that load on a shared machine hits all
   alike; the table shows medians. Time with one CPU thread is the process' CPU time
   (``time.process_time``: a shared machine's other load does not count), otherwise (CUDA, several
   threads) wall time; every mode calls ``zero_grad(set_to_none=True)``. Peak memory on CPU: the
   process' peak resident size from right before the model is built (data loaded and collated,
   lazily imported libraries loaded by a 2x2 warm-up), above the resident size then — Linux VmHWM
   after resetting it through ``/proc/self/clear_refs`` (``ru_maxrss`` where that is unavailable) —
   so parameters, gradients, optimizer state, activations and DP buffers all count; the workers run
   with glibc's mmap threshold fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so a freed large
   tensor leaves the resident set at once and the peak follows live tensors, not what the allocator
   happens to retain. On CUDA, ``max_memory_allocated`` above the allocation before the model.
2. Utility: test accuracy at ε ∈ {1, 3, 8} (δ = 1e-5, PRV accountant, σ from Opacus'
   ``get_noise_multiplier`` for the planned epochs, Poisson sampling) for adamw, adamw with
   DP-AdamBC bias correction, lion, muon, shampoo (when registered) and DP-ZO (the ``zo_sgd``
   recipe with its scalar privatized; batch 16 and 3x the epochs, since a two-point step carries
   one scalar), next to each one's non-private
   accuracy. Each cell is the best of a small learning-rate grid, chosen on a validation split
   held out from the training split (the test split is only used for the reported number).
"""
from __future__ import annotations

import gc
import json
import math
import os
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
    cost_repeats: int = 3
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
            criterion = out[2] if len(out) == 4 else None
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
COST_MODES = ("non-private", "hooks", "ghost", "ghost_bk")
HOOKS_LIMIT_BYTES = 2**31  # hooks mode holds B per-sample gradients: skipped above 2 GiB of them
MALLOC_ENV = "MALLOC_MMAP_THRESHOLD_"  # fixed in the workers: freed large tensors return to the OS at once


@dataclass(frozen=True)
class CostWorkload:
    """A cost-table workload: name, batch size, and what dominates its memory."""

    name: str
    batch_size: int
    note: str
    steps: int | None = None  # timed iterations (None: Settings.cost_steps)


#: a LLaMA of the bench's LM family at a width where compute, not per-op overhead, dominates on a CPU
LLAMA_WIDE = {"dim": 256, "depth": 4, "heads": 4, "hidden": 688, "context": 128}


def cost_workloads(s: Settings) -> list[CostWorkload]:
    """Small workloads (per-op overhead dominates) and the large-batch regime DP-SGD trains in (noise
    and clipping are paid once per step, so their share falls as the batch grows)."""
    return [CostWorkload("digits_mlp", s.batch_size, "64-256-128-10 ReLU MLP on digits: activations dominate"),
            CostWorkload("wide_mlp", 256, "784-2048-2048-2048-10 ReLU MLP, 10.0M params (random data): "
                                          "parameters dominate"),
            CostWorkload("wide_mlp", 1024, "the same at batch 1024 (DP-SGD's large-batch regime)", steps=10),
            CostWorkload("llama_char", 8, "bench LM llama_char (CPU config: 2 layers, width 64, context 64)"),
            CostWorkload("llama_wide", 16, "the bench LM at width 256, 4 layers, context 128 (3.3M params)",
                         steps=10)]


def _cost_setup(name: str, batch_size: int, device: torch.device) -> tuple[Any, TensorDataset, Any]:
    """(model factory, dataset, loss(model_output, targets, criterion)) of a cost workload."""
    if name == "digits_mlp":
        data = load_digits_split()
        return (lambda: build_mlp(data.num_features, data.num_classes, seed=0),
                TensorDataset(data.x_train.to(device), data.y_train.to(device)), None)
    if name == "wide_mlp":
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(4 * batch_size, 784, generator=g), torch.randint(0, 10, (4 * batch_size,), generator=g)
        return (lambda: build_mlp(784, 10, hidden=(2048, 2048, 2048), seed=0),
                TensorDataset(x.to(device), y.to(device)), None)
    if name in ("llama_char", "llama_wide"):
        from distopt.bench.workloads_lm import Llama, RMSNorm, llama_char
        from distopt.privacy.book_keeping import register_layer

        register_layer(RMSNorm, "rms_norm")  # the LM's RMSNorm computes F.rms_norm(x, (d,), weight, eps)
        w = llama_char("cpu")
        w.batch_size = batch_size
        if name == "llama_wide":  # the same data and model family, wider (build() seeds, then calls _model_fn)
            w.context, w._model_fn = LLAMA_WIDE["context"], lambda seed: Llama(128, **LLAMA_WIDE)
        batches = w.batches(0)
        xs, ys = zip(*(next(batches) for _ in range(4)))
        ds = TensorDataset(torch.cat(xs).to(device), torch.cat(ys).to(device))

        def lm_loss(logits: torch.Tensor, yb: torch.Tensor, criterion: Any) -> Any:
            if criterion is None:
                return nn.functional.cross_entropy(logits.flatten(0, 1), yb.flatten())
            return criterion(logits.flatten(0, 1), yb.flatten(), shape=logits.shape[:2])  # one privacy unit: a window
        return (lambda: w.build(0), ds, lm_loss)
    raise ValueError(f"unknown cost workload {name!r}")


class _Peak:
    """Peak resident memory of this process from ``start()`` on, above the resident size at ``start()``: Linux
    ``/proc/self/clear_refs`` (5 resets VmHWM to the current RSS) then VmHWM - VmRSS(start); without it,
    ``ru_maxrss`` - VmRSS(start) (an over-estimate if an earlier peak was higher)."""

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def start(self) -> None:
        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact = True
        except OSError:
            self.exact = False
        self.base = self._status("VmRSS:")

    def peak(self) -> int:
        top = self._status("VmHWM:") if self.exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return top - self.base


def _import_everything(mode: str, s: Settings) -> None:
    """One private step of a 2x2 linear model in ``mode``: loads every module the measured run will need."""
    from distopt.privacy import make_private

    model = nn.Linear(2, 2)
    data = TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    out = make_private(model, distopt.create("adamw", model.parameters(), lr=1e-3), DataLoader(data, batch_size=2),
                       noise_multiplier=1.0, max_grad_norm=s.max_grad_norm, poisson_sampling=False,
                       grad_sample_mode="hooks" if mode == "non-private" else mode)
    for xb, yb in out[-1]:
        out[1].zero_grad()
        logits = out[0](xb)
        (out[2](logits, yb) if len(out) == 4 else nn.functional.cross_entropy(logits, yb)).backward()
        out[1].step()
        out[1].privacy_spent()


def _cost_worker(workload: str, batch_size: int, mode: str, s: Settings, steps: int | None = None) -> dict[str, Any]:
    """Time and peak memory of ``s.cost_steps`` adamw iterations of ``workload``, non-private or private.

    Peak memory (CPU) counts everything built for training: model, gradients, optimizer state,
    activations and DP buffers, above the resident size right before the model is built (data loaded
    and batches collated before that). CUDA: ``max_memory_allocated`` above the allocation before."""
    torch.set_num_threads(s.threads)
    warnings.simplefilter("ignore")
    from opacus.optimizers.optimizer import _generate_noise

    from distopt.privacy import make_private

    device = torch.device(s.device)
    build, dataset, loss_fn = _cost_setup(workload, batch_size, device)
    loss_fn = loss_fn or (lambda out, yb, crit: crit(out, yb) if crit else nn.functional.cross_entropy(out, yb))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [(xb, yb) for xb, yb in loader]  # collated before the baseline: data is not training memory
    _import_everything(mode, s)  # libraries loaded lazily (Opacus, its accountants, scipy) are not training memory
    meter = _Peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        meter.start()
    model = build().to(device)
    opt = distopt.create("adamw", model.parameters(), lr=1e-3)
    criterion = None
    if mode != "non-private":
        out = make_private(model, opt, loader, noise_multiplier=1.0, max_grad_norm=s.max_grad_norm,
                           grad_sample_mode=mode, poisson_sampling=False)
        model, opt = out[0], out[1]
        criterion = out[2] if len(out) == 4 else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cpu_clock = device.type == "cpu" and s.threads == 1  # one thread: this process' CPU time is its compute time
    clock = time.process_time if cpu_clock else time.perf_counter

    times, fwd_bwd = [], []
    for i in range((steps or s.cost_steps) + 1):  # the first: warm-up (allocator, lazy optimizer state)
        xb, yb = batches[i % len(batches)]
        sync()
        t0 = clock()
        opt.zero_grad(set_to_none=True)  # every mode: no memset of the old gradients
        loss_fn(model(xb), yb, criterion).backward()
        sync()
        t1 = clock()
        opt.step()
        sync()
        if i:
            times.append(clock() - t0)
            fwd_bwd.append(t1 - t0)
    peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" else meter.peak()
    params = [p for p in model.parameters() if p.requires_grad]
    noise = []
    for _ in range(3 if mode != "non-private" else 0):  # what Opacus' Gaussian draw alone costs per step
        sync()
        t0 = clock()
        for p in params:
            _generate_noise(std=1.0, reference=p)
        sync()
        noise.append(clock() - t0)
    return {"workload": workload, "mode": mode, "step_ms": 1e3 * statistics.median(times),
            "fwd_bwd_ms": 1e3 * statistics.median(fwd_bwd),
            "noise_ms": 1e3 * statistics.median(noise) if noise else 0.0,
            "peak_mb": peak / 2**20, "params": sum(p.numel() for p in params), "batch_size": batch_size,
            "exact_peak": device.type == "cuda" or meter.exact, "clock": "cpu" if cpu_clock else "wall"}


def _hooks_bytes(w: CostWorkload) -> int:
    """Bytes of the B per-sample gradients that hooks mode materializes (float32)."""
    build = _cost_setup(w.name, w.batch_size, torch.device("cpu"))[0]
    return 4 * w.batch_size * sum(p.numel() for p in build().parameters())


def cost(s: Settings, modes: tuple[str, ...] = COST_MODES,
         workloads: list[CostWorkload] | None = None) -> list[dict[str, Any]]:
    """Every (workload, mode) ``s.cost_repeats`` times, each in a fresh spawned process (its own peak), the
    modes alternating in order and reverse order across repeats so that machine load hits all alike;
    medians over the repeats."""
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    skipped = []
    old_env = os.environ.get(MALLOC_ENV)
    os.environ[MALLOC_ENV] = "131072"  # read by glibc when a spawned worker starts
    try:
        _run_cost(s, modes, workloads, runs, skipped)
    finally:
        if old_env is None:
            os.environ.pop(MALLOC_ENV, None)
        else:
            os.environ[MALLOC_ENV] = old_env
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        for key in ("step_ms", "fwd_bwd_ms", "noise_ms", "peak_mb"):
            row[key] = statistics.median(r[key] for r in rs)
        row["repeats"] = len(rs)
        rows.append(row)
    names = list(dict.fromkeys((r["workload"], r["batch_size"]) for r in rows + skipped))
    return sorted(rows + skipped, key=lambda r: (names.index((r["workload"], r["batch_size"])), modes.index(r["mode"])))


def _run_cost(s: Settings, modes: tuple[str, ...], workloads: list[CostWorkload] | None,
              runs: dict[tuple[str, int, str], list[dict[str, Any]]], skipped: list[dict[str, Any]]) -> None:
    for w in workloads if workloads is not None else cost_workloads(s):
        hooks_bytes = _hooks_bytes(w) if "hooks" in modes else 0
        todo = [m for m in modes if not (m == "hooks" and hooks_bytes > HOOKS_LIMIT_BYTES)]
        skipped += [{"workload": w.name, "mode": m, "skipped": f"per-sample gradients need "
                     f"{hooks_bytes / 2**30:.1f} GiB", "batch_size": w.batch_size} for m in modes if m not in todo]
        for rep in range(s.cost_repeats):
            for mode in todo if rep % 2 == 0 else todo[::-1]:
                if s.device == "cuda":  # the CUDA allocator's peak can be reset: one process is enough
                    r = _cost_worker(w.name, w.batch_size, mode, s, w.steps)
                else:
                    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                        r = pool.submit(_cost_worker, w.name, w.batch_size, mode, s, w.steps).result()
                runs.setdefault((w.name, w.batch_size, mode), []).append(r)


# ------------------------------------------------------------------------------------------ report
def print_cost(rows: list[dict[str, Any]], plain: bool = False) -> None:
    table = []
    for r in rows:
        base = next((b for b in rows if (b["workload"], b["batch_size"]) == (r["workload"], r["batch_size"])
                     and b["mode"] == "non-private"), None)
        if "skipped" in r:
            table.append([r["workload"], r["mode"], "-", "-", "-", "-", "-", "-", "-", f"skipped: {r['skipped']}"])
            continue
        ratio = lambda key: f"{r[key] / base[key]:.2f}x" if base and base[key] > 0 else "-"  # noqa: E731
        table.append([r["workload"], r["mode"], f"{r['step_ms']:.1f}", ratio("step_ms"), f"{r['fwd_bwd_ms']:.1f}",
                      ratio("fwd_bwd_ms"), f"{r['noise_ms']:.1f}" if r["noise_ms"] else "-", f"{r['peak_mb']:.1f}",
                      ratio("peak_mb"), f"{r['params']} params, batch {r['batch_size']}"])
    exact = all(r.get("exact_peak", True) for r in rows)
    clock = "CPU time of the process" if rows and rows[0].get("clock") == "cpu" else "wall time"
    title = (f"cost of DP-SGD (adamw; {clock}; medians over repeats of fresh processes, modes alternated): iteration = "
             "forward+backward+step, fwd+bwd = forward+backward (the clipping), noise = Opacus' Gaussian draw alone "
             "(part of the step); peak = training peak RSS above the RSS before the model is built, glibc mmap "
             "threshold fixed at 128 KiB"
             + (" (VmHWM reset by clear_refs)" if exact else " (ru_maxrss)"))
    render_table(["workload", "mode", "iter ms", "iter vs np", "fwd+bwd ms", "fwd+bwd vs np", "noise ms", "peak MB",
                  "memory vs np", "size"], table, title, plain=plain)
    notes = {(w.name, w.batch_size): w.note for w in cost_workloads(Settings())}
    for name, batch in dict.fromkeys((r["workload"], r["batch_size"]) for r in rows):
        note = notes.get((name, batch)) or next((v for (n, _), v in notes.items() if n == name), "")
        print(f"  {name}, batch {batch}: {note}")


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
                 device=args.device, threads=args.threads, cost_steps=args.cost_steps, grad_sample_mode=args.mode,
                 cost_repeats=args.cost_repeats)
    if args.quick:
        s.epochs, s.seeds, s.lr_factors, s.cost_steps = min(s.epochs, 3), 1, (1.0,), min(s.cost_steps, 10)
        s.cost_repeats = 1
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
