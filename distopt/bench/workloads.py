"""The default workload: an MLP classifying scikit-learn's bundled 8x8 digits (no download).

1797 images, 64 features scaled to [0, 1], 10 classes; a fixed stratified split of 1437 train /
360 test examples (``random_state=0``), identical for every run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distopt.bench import require


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
