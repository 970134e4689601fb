"""The federated *task*: model, data, local training and evaluation, free of Flower.

A task is any object with four methods (:class:`Task`); distopt's ClientApp and ServerApp
factories call them and do everything Flower-specific themselves:

- ``build_model() -> nn.Module``: the same initial model on every call (seed it);
- ``load_partition(partition_id, num_partitions) -> torch Dataset``: one client's data;
- ``train(model, optimizer, data, steps) -> dict``: ``steps`` optimizer steps over ``data``,
  an iterable of ``(inputs, targets)`` batches (the client passes a seeded ``DataLoader``, or
  Opacus' Poisson-sampling loader under sample-level DP). Call ``optimizer.step(closure)``
  with a closure that recomputes the loss and calls ``backward()`` unless
  ``getattr(optimizer, "closure_kind", "backward") == "forward"`` (zeroth-order optimizers
  evaluate the loss at perturbed weights and need no gradient); return metrics as floats;
- ``evaluate(model, data) -> dict``: metrics of ``model`` on a Dataset (``loss``, ``accuracy``).

Optional: ``batch_size`` (default 32) and ``load_centralized() -> Dataset`` (a held-out set the
ServerApp evaluates the global model on after every round).

:class:`DigitsTask` is the reference task: an MLP on scikit-learn's bundled digits
(:mod:`distopt.bench.workloads`), partitioned by :mod:`.partition` (IID, Dirichlet, pathological).
Before calling ``train`` the client seeds torch's global RNG from (seed, round, partition), so
a task that draws its randomness from torch is reproducible.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset


@runtime_checkable
class Task(Protocol):
    """What distopt's federated apps need from user code (no Flower import required)."""

    def build_model(self) -> nn.Module: ...

    def load_partition(self, partition_id: int, num_partitions: int) -> Dataset: ...

    def train(self, model: nn.Module, optimizer: Any, data: Iterable[Any], steps: int) -> Mapping[str, float]: ...

    def evaluate(self, model: nn.Module, data: Dataset) -> Mapping[str, float]: ...


def closure_for(model: nn.Module, optimizer: Any, loss_fn: Any, x: Tensor, y: Tensor):
    """A closure for ``optimizer.step``: zero grads, loss, ``backward()`` unless the optimizer
    only needs forward evaluations (``closure_kind == "forward"``, zeroth-order).

    The first loss it computed is kept in ``closure.loss`` (a float): Opacus' ``DPOptimizer``
    runs the closure but returns ``None`` from ``step``."""
    needs_grad = getattr(optimizer, "closure_kind", "backward") != "forward"

    def closure() -> Tensor:
        if needs_grad:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            with torch.no_grad():
                loss = loss_fn(model(x), y)
        if closure.loss is None:  # type: ignore[attr-defined]
            closure.loss = float(loss.detach())  # type: ignore[attr-defined]
        return loss

    closure.loss = None  # type: ignore[attr-defined]
    return closure


def cycle_batches(data: Iterable[Any], steps: int) -> Iterable[Any]:
    """``steps`` batches from ``data``, restarting it when exhausted (empty data: none)."""
    produced = 0
    while produced < steps:
        empty = True
        for batch in data:
            empty = False
            yield batch
            produced += 1
            if produced == steps:
                return
        if empty:
            return


@functools.lru_cache(maxsize=2)
def _digits() -> Any:
    from distopt.bench.workloads import load_digits_split

    return load_digits_split()


@dataclass(frozen=True)
class DigitsTask:
    """MLP on the 8x8 digits (1437 train / 360 test), partitioned among the clients.

    ``partition``: ``iid``, ``dirichlet:ALPHA`` or ``pathological:K`` (seeded by ``seed``).
    """

    partition: str = "iid"
    seed: int = 0
    hidden: tuple[int, ...] = (32,)
    batch_size: int = 32

    def build_model(self) -> nn.Module:
        from distopt.bench.workloads import build_mlp

        data = _digits()
        return build_mlp(data.num_features, data.num_classes, hidden=tuple(self.hidden), seed=self.seed)

    def load_partition(self, partition_id: int, num_partitions: int) -> Dataset:
        from distopt.integrations.flower.partition import partition_arrays

        data = _digits()
        parts = partition_arrays(data.x_train.numpy(), data.y_train.numpy(), self.partition, num_partitions, self.seed)
        x, y = parts.load(partition_id)
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    def load_centralized(self) -> Dataset:
        data = _digits()
        return TensorDataset(data.x_test, data.y_test)

    def train(self, model: nn.Module, optimizer: Any, data: Iterable[Any], steps: int) -> dict[str, float]:
        model.train()
        losses = []
        for x, y in cycle_batches(data, steps):
            closure = closure_for(model, optimizer, _loss_fn, x, y)
            optimizer.step(closure)
            if len(y):
                losses.append(closure.loss)
        return {"train-loss": sum(losses) / len(losses) if losses else 0.0}

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        model.eval()
        n = len(data)  # type: ignore[arg-type]
        if n == 0:
            return {"loss": 0.0, "accuracy": 0.0}
        x, y = _stack(data)
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y).item()
            acc = (logits.argmax(1) == y).float().mean().item()
        return {"loss": loss, "accuracy": acc}


def _loss_fn(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy; an empty batch (Poisson sampling under DP) gives a zero loss whose
    gradient is zero, so the step still happens (with DP noise only), as in DP-SGD."""
    if len(y) == 0:
        return logits.sum() * 0.0
    return nn.functional.cross_entropy(logits, y)


def _stack(data: Dataset) -> tuple[Tensor, Tensor]:
    if isinstance(data, TensorDataset):
        return data.tensors[0], data.tensors[1]
    xs, ys = zip(*(data[i] for i in range(len(data))))  # type: ignore[arg-type]
    return torch.stack(list(xs)), torch.as_tensor(ys)


__all__ = ["DigitsTask", "Task", "closure_for", "cycle_batches"]
