"""The task of this Flower app, free of Flower: distopt's digits MLP, partitioned by the
``partition`` run-config key. Replace ``make_task`` by your own object with ``build_model``,
``load_partition``, ``train``, ``evaluate`` (see ``distopt.integrations.flower.task.Task``)."""
from __future__ import annotations

from typing import Any, Mapping

from distopt.federated import DigitsTask


def make_task(run_config: Mapping[str, Any]) -> DigitsTask:
    return DigitsTask(partition=str(run_config.get("partition", "iid")), seed=int(run_config.get("seed", 0)),
                      batch_size=int(run_config.get("batch-size", 32)))
