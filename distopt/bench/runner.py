"""Train loop and run records of the default suite.

Each run trains a fresh MLP (seeded) with one optimizer at one learning rate, in minibatches,
through the usual ``optimizer.step(closure)`` protocol (so optimizers that re-evaluate the loss
work too). Time spent inside ``step()`` but outside the closure is the optimizer's own time.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

import distopt
from distopt.bench import optional
from distopt.bench.workloads import Dataset, build_mlp

# Per-optimizer base learning rate (tuned so the best of base x LR_FACTORS is usually the middle one on this
# workload) and extra hyperparameters of the default suite.
SUITE: dict[str, tuple[float, dict[str, Any]]] = {
    "sgd": (0.1, {"momentum": 0.9}),
    "adam": (3e-3, {}),
    "adamw": (3e-3, {}),
    "lion": (3e-4, {}),
    "lamb": (3e-3, {}),
    "adafactor": (3e-2, {}),
}
LR_FACTORS = (0.3, 1.0, 3.0)


@dataclass(frozen=True)
class RunConfig:
    optimizer: str
    lr: float
    seed: int
    epochs: int
    batch_size: int = 64
    target_loss: float = 0.1
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunRecord:
    """Everything one run produced; one line of ``results.jsonl``."""

    optimizer: str
    lr: float
    seed: int
    epochs: int
    batch_size: int
    hparams: dict[str, Any]
    steps: int = 0
    train_loss: list[float] = field(default_factory=list)  # full train set, after each epoch
    test_acc: list[float] = field(default_factory=list)  # after each epoch
    final_train_loss: float = math.nan
    final_test_acc: float = math.nan
    target_loss: float = 0.1
    steps_to_target: int | None = None  # first step whose smoothed minibatch loss <= target
    step_ms: float = math.nan  # mean optimizer time per step (closure excluded)
    iter_ms: float = math.nan  # mean wall time per training iteration
    wall_s: float = 0.0
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_grid(names: Iterable[str], seeds: int, epochs: int, factors: tuple[float, ...] = LR_FACTORS,
               **kwargs: Any) -> list[RunConfig]:
    """Runs for each optimizer x lr (base lr times ``factors``) x seed."""
    configs = []
    for name in names:
        base, hparams = SUITE.get(name, (distopt.get(name).hyperparameters()["lr"].default, {}))
        for factor in factors:
            lr = float(f"{base * factor:.3g}")
            configs += [RunConfig(name, lr, seed, epochs, hparams=dict(hparams), **kwargs) for seed in range(seeds)]
    return configs


def _batches(data: Dataset, batch_size: int, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(data.y_train), generator=gen)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        yield data.x_train[idx], data.y_train[idx]


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """(train loss, test accuracy) on the full sets."""
    loss = nn.functional.cross_entropy(model(data.x_train), data.y_train).item()
    acc = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return loss, acc


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Dataset, cfg: RunConfig,
                 gen: torch.Generator, rec: RunRecord, timing: dict[str, float]) -> float:
    smooth = timing.get("smooth", math.nan)
    for xb, yb in _batches(data, cfg.batch_size, gen):
        def closure() -> torch.Tensor:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            if torch.is_grad_enabled():
                loss.backward()
            timing["closure"] += time.perf_counter() - t
            return loss.detach()

        t0 = time.perf_counter()
        out = opt.step(closure)
        loss = math.nan if out is None else float(out)
        timing["iter"] += time.perf_counter() - t0
        rec.steps += 1
        smooth = loss if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss
        if rec.steps_to_target is None and rec.steps >= 10 and smooth <= cfg.target_loss:
            rec.steps_to_target = rec.steps
    timing["smooth"] = smooth
    return smooth


def run_one(cfg: RunConfig, data: Dataset) -> RunRecord:
    """Train one model; errors are recorded, not raised, so one bad optimizer doesn't stop a suite."""
    rec = RunRecord(cfg.optimizer, cfg.lr, cfg.seed, cfg.epochs, cfg.batch_size, cfg.hparams,
                    target_loss=cfg.target_loss)
    model = build_mlp(data.num_features, data.num_classes, seed=cfg.seed)
    gen = torch.Generator().manual_seed(1000 + cfg.seed)
    timing = {"closure": 0.0, "iter": 0.0}
    start = time.perf_counter()
    try:
        opt = distopt.create(cfg.optimizer, model.parameters(), lr=cfg.lr, **cfg.hparams)
        for _ in range(cfg.epochs):
            _train_epoch(model, opt, data, cfg, gen, rec, timing)
            loss, acc = evaluate(model, data)
            rec.train_loss.append(loss)
            rec.test_acc.append(acc)
    except Exception as exc:  # noqa: BLE001
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.wall_s = time.perf_counter() - start
    if rec.train_loss:
        rec.final_train_loss, rec.final_test_acc = rec.train_loss[-1], rec.test_acc[-1]
    if rec.steps:
        rec.step_ms = 1e3 * (timing["iter"] - timing["closure"]) / rec.steps
        rec.iter_ms = 1e3 * timing["iter"] / rec.steps
    return rec


def run_suite(configs: list[RunConfig], data: Dataset, progress: bool = True) -> list[RunRecord]:
    """Run every config in order, with a progress bar on stderr when tqdm is installed."""
    tqdm = optional("tqdm")
    bar = tqdm.tqdm(total=len(configs), unit="run", disable=not progress) if tqdm else None
    records = []
    for cfg in configs:
        if bar is not None:
            bar.set_description(f"{cfg.optimizer} lr={cfg.lr:g} seed={cfg.seed}")
        records.append(run_one(cfg, data))
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return records
