"""Workloads of the benchmark: what is trained, on which data, how it is scored, for how long.

A :class:`Workload` gives

- ``build(seed)``: a freshly initialised model (the *init* seed);
- ``batches(data_seed)``: an endless stream of training batches in an order fixed by a separate
  *data-order* seed (so init and data noise can be varied independently);
- ``loss(model, batch)`` and ``evaluate(model, split)`` on the ``"val"`` split (used for tuning
  and targets) or the ``"test"`` split (reported only);
- its ``metric`` (``accuracy``, higher is better, or ``loss``, lower is better), the per-run step
  budget ``budget`` (B), ``eval_every``, the value a diverged run scores (``failure_value``: chance
  accuracy or the loss of a uniform predictor) and ``sensitivity_delta`` (the tolerance of the
  learning-rate sensitivity width).

The workloads themselves live in :mod:`distopt.bench.workloads_vision` (MLP and residual CNN on
scikit-learn's digits, a patch Transformer on MNIST-1D) and :mod:`distopt.bench.workloads_lm`
(a LLaMA-style character LM on Python's own sources, and the LLaMA-60M configuration for GPUs);
:func:`make_workload` builds one by name. Nothing is downloaded: the data ship with scikit-learn,
are generated (MNIST-1D) or are text installed with Python.

The legacy helpers :func:`load_digits_split` and :func:`build_mlp` are kept for scripts.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from distopt.bench import require

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Dataset:
    """Train and test tensors of a classification workload."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def load_digits_split(test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """The digits data set as float32 tensors, split once with a fixed seed."""
    datasets = require("sklearn.datasets")
    model_selection = require("sklearn.model_selection")
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x / 16.0, y, test_size=test_fraction, random_state=split_seed, stratify=y
    )
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return Dataset(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te), num_classes=10)


def build_mlp(num_features: int, num_classes: int, hidden: tuple[int, ...] = (256, 128), seed: int = 0) -> nn.Module:
    """A ReLU MLP, initialised deterministically from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = num_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------- base


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors (inputs and integer labels) of a classification task."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        return {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}[name]

    def to(self, device: str) -> Splits:
        t = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return Splits(**t, num_classes=self.num_classes)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
            h.update(getattr(self, k).detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


class Workload:
    """One benchmark task (see the module docstring). Subclasses fill the class attributes in
    ``__init__`` and implement :meth:`build`, :meth:`batches`, :meth:`loss` and :meth:`evaluate`."""

    name: str
    proxy: str = ""  # the survey workload this stands for
    metric: str = "accuracy"
    budget: int = 300
    batch_size: int = 64
    eval_every: int = 25
    failure_value: float = 0.0
    sensitivity_delta: float = 0.01
    device: str = "cpu"
    kind: ClassVar[str] = "classification"

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def build(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def batches(self, data_seed: int) -> Iterator[Batch]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """``{"metric": ..., "loss": ...}`` on ``split`` (``"val"`` or ``"test"``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A short hash of the data (so cached results are tied to the data they saw)."""
        return ""

    def config(self) -> dict[str, Any]:
        """Everything that defines the workload (part of every run record and cache key)."""
        return {"name": self.name, "proxy": self.proxy, "metric": self.metric, "budget": self.budget,
                "batch_size": self.batch_size, "eval_every": self.eval_every, "device": self.device,
                "failure_value": self.failure_value, "sensitivity_delta": self.sensitivity_delta,
                "model": dict(getattr(self, "model_config", {})), "data": self.fingerprint()}

    def with_budget(self, budget: int) -> Workload:
        """The same workload with another step budget (for the 3B horizon)."""
        import copy

        other = copy.copy(self)
        other.budget = int(budget)
        other.eval_every = max(1, self.eval_every * budget // max(self.budget, 1))
        return other


class ClassificationWorkload(Workload):
    """Classification on in-memory tensors: reshuffled every epoch with the data-order seed."""

    def __init__(self, name: str, splits: Callable[[], Splits], model: Callable[[int], nn.Module], *,
                 proxy: str, budget: int, batch_size: int, eval_every: int, device: str = "cpu",
                 model_config: dict[str, Any] | None = None, sensitivity_delta: float = 0.01) -> None:
        self.name, self.proxy, self.budget, self.batch_size, self.eval_every = name, proxy, budget, batch_size, eval_every
        self.device, self.model_config, self.sensitivity_delta = device, model_config or {}, sensitivity_delta
        self._splits_fn, self._model_fn, self._splits = splits, model, None
        self.metric = "accuracy"

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            self._splits = self._splits_fn().to(self.device)
        return self._splits

    @property
    def failure_value(self) -> float:  # type: ignore[override]
        return 1.0 / self.splits.num_classes

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = self.splits.fingerprint()
        return self._fingerprint

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self._model_fn(seed).to(self.device)

    def batches(self, data_seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(data_seed)
        x, y = self.splits.x_train, self.splits.y_train
        n = len(y)
        while True:
            order = torch.randperm(n, generator=gen).to(self.device)
            for i in range(0, n - self.batch_size + 1, self.batch_size):  # drop the ragged last batch
                idx = order[i:i + self.batch_size]
                yield x[idx], y[idx]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        x, y = self.splits.split(split)
        correct, total_loss = 0, 0.0
        for i in range(0, len(y), 1024):
            logits = model(x[i:i + 1024]).float()
            total_loss += nn.functional.cross_entropy(logits, y[i:i + 1024], reduction="sum").item()
            correct += int((logits.argmax(1) == y[i:i + 1024]).sum())
        model.train(was_training)
        return {"metric": correct / len(y), "loss": total_loss / len(y)}


class LanguageModelWorkload(Workload):
    """Next-token prediction on a 1-D token stream: random windows of ``context + 1`` tokens for
    training (positions drawn with the data-order seed), fixed evenly spaced windows for evaluation.
    The metric is the mean cross-entropy in nats per token (lower is better)."""

    kind = "language_model"

    def __init__(self, name: str, tokens: Callable[[], dict[str, Tensor]], model: Callable[[int], nn.Module], *,
                 proxy: str, vocab_size: int, context: int, budget: int, batch_size: int, eval_every: int,
                 eval_windows: int = 32, device: str = "cpu", model_config: dict[str, Any] | None = None,
                 sensitivity_delta: float = 0.05, corpus: dict[str, Any] | None = None) -> None:
        self.name, self.proxy, self.budget, self.batch_size, self.eval_every = name, proxy, budget, batch_size, eval_every
        self.vocab_size, self.context, self.eval_windows = vocab_size, context, eval_windows
        self.device, self.model_config, self.sensitivity_delta = device, model_config or {}, sensitivity_delta
        self._tokens_fn, self._model_fn, self._tokens = tokens, model, None
        self.metric = "loss"
        self.failure_value = math.log(vocab_size)
        self.corpus = corpus or {}

    @property
    def tokens(self) -> dict[str, Tensor]:
        if self._tokens is None:
            self._tokens = {k: v.to(self.device) for k, v in self._tokens_fn().items()}
        return self._tokens

    def fingerprint(self) -> str:
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            for k in ("train", "val", "test"):
                h.update(self.tokens[k].cpu().numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def config(self) -> dict[str, Any]:
        return {**super().config(), "vocab_size": self.vocab_size, "context": self.context,
                "eval_windows": self.eval_windows, "corpus": self.corpus,
                "amp": "bf16" if self.device.startswith("cuda") else None}

    def build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return self._model_fn(seed).to(self.device)

    def batches(self, data_seed: int) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(data_seed)
        data = self.tokens["train"]
        span = len(data) - self.context - 1
        offsets = torch.arange(self.context + 1, device=self.device)
        while True:
            starts = torch.randint(0, span, (self.batch_size,), generator=gen).to(self.device)
            window = data[starts[:, None] + offsets]
            yield window[:, :-1], window[:, 1:]

    def _amp(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on CUDA (the LM workloads' matmuls), nothing on CPU."""
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        with self._amp():
            logits = model(batch[0])
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[1].flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        data = self.tokens[split]
        span = len(data) - self.context - 1
        starts = torch.linspace(0, span, self.eval_windows, device=self.device).long()
        offsets = torch.arange(self.context + 1, device=self.device)
        total = 0.0
        for i in range(0, len(starts), 16):
            window = data[starts[i:i + 16, None] + offsets]
            with self._amp():
                logits = model(window[:, :-1])
            logits = logits.float()
            total += nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten(),
                                                 reduction="sum").item()
        model.train(was_training)
        loss = total / (len(starts) * self.context)
        return {"metric": loss, "loss": loss}


# ------------------------------------------------------------------------------------------ registry

SMALL = ("mlp_digits", "cnn_digits", "vit_mnist1d", "llama_char")
"""The CPU workloads (offline data); ``llama_60m`` is added on CUDA."""


def workload_names(device: str = "cpu") -> tuple[str, ...]:
    """Every workload of ``--suite full`` on ``device``."""
    return SMALL + (("llama_60m",) if device.startswith("cuda") else ())


def all_workload_names() -> tuple[str, ...]:
    return SMALL + ("llama_60m", "resnet50_imagenet", "vit_s_imagenet", "llama_60m_wikitext")


def make_workload(name: str, device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    """Build the workload ``name`` for ``device`` (``cuda`` scales models, batches and budgets up;
    ``quick`` shrinks budgets for smoke tests). ``data`` is a user path for the workloads that
    need one (ImageNet, tokenized text)."""
    from distopt.bench import workloads_lm, workloads_vision

    factories = {**workloads_vision.FACTORIES, **workloads_lm.FACTORIES}
    if name not in factories:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(sorted(factories))}")
    return factories[name](device=device, quick=quick, data=data)


__all__ = ["Batch", "ClassificationWorkload", "Dataset", "LanguageModelWorkload", "SMALL", "Splits", "Workload",
           "all_workload_names", "build_mlp", "load_digits_split", "make_workload", "workload_names"]
