"""Zeroth-order machinery shared by the ``zeroth_order`` recipes (``zo_sgd``, ``hizoo``, ``lozo``, ...).

    import distopt, distopt.zo
    opt = distopt.create("zo_sgd", model.parameters(), lr=1e-6, eps=1e-3, record=True)
    loss = opt.step(lambda: model(**batch).loss)        # forward passes only, no backward
    distopt.zo.replay(initial_model, opt.log)            # rebuild the weights from (seed, scalars)

- :mod:`~distopt.zo.perturb`: counter-based directions z = f(seed, step, k, global index);
- :mod:`~distopt.zo.layout`: the flat model vector, shards (DTensor ``Shard(0)``);
- :mod:`~distopt.zo.evaluate`: perturbing exactly (``on_use`` / ``in_place``);
- :mod:`~distopt.zo.estimator`: the E operators (SPSA, HiZOO, LOZO, Sparse-MeZO);
- :mod:`~distopt.zo.optimizer`: the optimizer shell of the family;
- :mod:`~distopt.zo.replay`: the seed-replay log; :mod:`~distopt.zo.distributed`: data-parallel
  ZO (``process_group=``, 8·n bytes a step); :mod:`~distopt.zo.memory`: exact live-byte counter;
- ``distopt.zo.hf``: ``ZOTrainer`` for Hugging Face transformers (imported on demand);
  :mod:`~distopt.zo.lm_task`: the example fine-tuning task (``examples/zo_finetune_llm.py``,
  ``distopt bench zo --convergence``).

A step with per-example losses and a custom reduction of the scalars (DP-ZO's clip and noise):
``opt.step_per_example(closure, reduce)``.
"""
from __future__ import annotations

from typing import Any

from distopt.zo.distributed import CommCounter, DataParallelZO, ranks_agree
from distopt.zo.memory import LiveBytes
from distopt.zo.optimizer import ZOOptimizer
from distopt.zo.replay import ZOLog, ZOStepRecord, replay

__all__ = ["CommCounter", "DataParallelZO", "LiveBytes", "ZOLog", "ZOOptimizer", "ZOStepRecord", "ranks_agree",
           "replay"]


def __getattr__(name: str) -> Any:
    if name == "hf":
        import importlib

        return importlib.import_module("distopt.zo.hf")
    raise AttributeError(f"module 'distopt.zo' has no attribute {name!r}")
