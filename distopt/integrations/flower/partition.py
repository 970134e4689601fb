"""Seeded partitioning of in-memory arrays into federated clients with flwr-datasets.

    parts = partition_arrays(x, y, "dirichlet:0.5", num_partitions=100, seed=0)
    xs, ys = parts.load(7)                      # numpy arrays of client 7

Schemes (``parse_scheme``):

- ``iid``: the rows are permuted with ``numpy.random.default_rng(seed)``, then
  :class:`flwr_datasets.partitioner.IidPartitioner` cuts contiguous, equal shards (it does not
  shuffle by itself);
- ``dirichlet:ALPHA``: :class:`~flwr_datasets.partitioner.DirichletPartitioner` over the label
  (Hsu et al. 2019), seeded; ``min_partition_size`` defaults to ``min(10, rows // (4 N))`` and,
  when the partitioner cannot meet it after its 10 attempts, is lowered to 1 and then 0 (with
  hundreds of clients on a small data set, some clients legitimately get no data) -- the size
  actually used is in :attr:`Partitions.notes`;
- ``pathological:K``: :class:`~flwr_datasets.partitioner.PathologicalPartitioner`, K classes
  per client (McMahan et al. 2017), seeded.

The arrays become a ``datasets.Dataset`` (columns ``x`` and ``label``) held in memory; nothing
is downloaded. Built partitions are cached per process, so a Ray actor that serves many
simulated clients partitions the data once.
"""
from __future__ import annotations

import functools
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distopt.integrations.flower._deps import require

SCHEMES = ("iid", "dirichlet:ALPHA", "pathological:K")


def parse_scheme(scheme: str) -> tuple[str, float | None]:
    """``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)``; raises ValueError naming the valid forms."""
    name, _, arg = scheme.strip().lower().partition(":")
    try:
        if name == "iid" and not arg:
            return "iid", None
        if name == "dirichlet" and float(arg) > 0:
            return "dirichlet", float(arg)
        if name == "pathological" and int(arg) >= 1:
            return "pathological", int(arg)
    except ValueError:
        pass
    raise ValueError(f"partition scheme {scheme!r} is not one of {', '.join(SCHEMES)} (ALPHA > 0, K >= 1)")


@dataclass
class Partitions:
    """A fitted partitioner over in-memory arrays."""

    scheme: str
    num_partitions: int
    seed: int
    partitioner: Any
    notes: list[str] = field(default_factory=list)

    def load(self, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id must be in [0, {self.num_partitions}), got {partition_id}")
        part = self.partitioner.load_partition(partition_id).with_format("numpy")
        if len(part) == 0:
            width = np.asarray(self.partitioner.dataset[0]["x"]).shape
            return np.zeros((0, *width), dtype=np.float32), np.zeros((0,), dtype=np.int64)
        return np.asarray(part["x"], dtype=np.float32), np.asarray(part["label"], dtype=np.int64)

    def sizes(self) -> list[int]:
        return [len(self.partitioner.load_partition(i)) for i in range(self.num_partitions)]


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


_ARRAYS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def partition_arrays(x: Any, y: Any, scheme: str, num_partitions: int, seed: int = 0) -> Partitions:
    """Partition rows ``x`` (N x ...) with labels ``y`` (N,) into ``num_partitions`` clients."""
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    key = _fingerprint(x, y)
    _ARRAYS.setdefault(key, (x, y))
    return _cached(key, scheme.strip().lower(), int(num_partitions), int(seed))


@functools.lru_cache(maxsize=16)
def _cached(key: str, scheme: str, num_partitions: int, seed: int) -> Partitions:
    datasets = require("datasets")
    part_mod = require("flwr_datasets.partitioner")
    x, y = _ARRAYS[key]
    kind, arg = parse_scheme(scheme)
    ds = datasets.Dataset.from_dict({"x": x, "label": y})
    notes: list[str] = []
    if kind == "iid":
        perm = np.random.default_rng(seed).permutation(len(y))
        partitioner = part_mod.IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = datasets.Dataset.from_dict({"x": x[perm], "label": y[perm]})
    elif kind == "pathological":
        partitioner = part_mod.PathologicalPartitioner(
            num_partitions=num_partitions, partition_by="label", num_classes_per_partition=int(arg),
            class_assignment_mode="random", seed=seed,
        )
        partitioner.dataset = ds
        with warnings.catch_warnings():  # "classes will NOT be used" when N * K < classes
            warnings.simplefilter("ignore")
            partitioner.load_partition(0)  # fit now, so errors surface here
    else:
        first = min(10, len(ds) // (4 * num_partitions))
        for min_size in dict.fromkeys((first, 1, 0)):
            partitioner = part_mod.DirichletPartitioner(
                num_partitions=num_partitions, partition_by="label", alpha=float(arg),
                min_partition_size=min_size, self_balancing=False, seed=seed,
            )
            partitioner.dataset = ds
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    partitioner.load_partition(0)
                break
            except ValueError:
                continue
        notes.append(f"dirichlet min_partition_size={min_size}")
    return Partitions(scheme, num_partitions, seed, partitioner, notes)
