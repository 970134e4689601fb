"""Tiny Flower-free tasks and Message helpers for tests/federated (importable by Ray workers:
Flower's Ray backend puts the driver's sys.path on the workers' PYTHONPATH)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distopt.integrations.flower.task import DigitsTask, closure_for, cycle_batches


@dataclass(frozen=True)
class TinyTask:
    """Softmax regression on a fixed random 3-class problem: 24 rows per client, 6 features."""

    rows: int = 24
    features: int = 6
    classes: int = 3
    seed: int = 0
    batch_size: int = 8
    fail_partition: int = -1  # this client raises inside train(), every round

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nn.Sequential(nn.Linear(self.features, 8), nn.Tanh(), nn.Linear(8, self.classes))

    def _data(self, offset: int, rows: int) -> TensorDataset:
        g = torch.Generator().manual_seed(1000 + self.seed)
        w = torch.randn(self.features, self.classes, generator=g)
        g2 = torch.Generator().manual_seed(offset)
        x = torch.randn(rows, self.features, generator=g2)
        return TensorDataset(x, (x @ w).argmax(1))

    def load_partition(self, partition_id: int, num_partitions: int) -> TensorDataset:
        part = self._data(partition_id + 1, self.rows)
        part.partition_id = partition_id  # type: ignore[attr-defined]
        return part

    def load_centralized(self) -> TensorDataset:
        return self._data(10_000, 200)

    def train(self, model: nn.Module, optimizer: Any, data: Any, steps: int) -> dict[str, float]:
        losses = []
        pid = getattr(getattr(data, "dataset", None), "partition_id", -1)
        for x, y in cycle_batches(data, steps):
            if pid == self.fail_partition:
                raise RuntimeError("simulated client crash")
            closure = closure_for(model, optimizer, nn.functional.cross_entropy, x, y)
            optimizer.step(closure)
            losses.append(closure.loss)
        return {"train-loss": sum(losses) / max(1, len(losses))}

    evaluate = DigitsTask.evaluate


def set_identity() -> None:
    """Messages built outside a Flower process need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def instruction(content: Any, node_id: int, message_type: str = "train") -> Any:
    from flwr.app import Message

    set_identity()
    return Message(content, message_type=message_type, dst_node_id=node_id)


def context(partition_id: int, num_partitions: int) -> Any:
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=100 + partition_id, node_config={"partition-id": partition_id,
                   "num-partitions": num_partitions}, state=RecordDict(), run_config={})
