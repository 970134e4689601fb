"""ClientApp: every round, ``local-steps`` steps of a distopt recipe on this SuperNode's partition.

The partition comes from the node config (``partition-id``, ``num-partitions``): in simulation
Flower sets them; a real SuperNode gets them from ``--node-config``. The handlers are distopt's
(:func:`distopt.federated.client_train` etc.), fed a spec built from the run config.
"""
from __future__ import annotations

from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from distopt.federated import ClientSpec, SampleDP, ZOConfig, client_evaluate, client_train
from distopt.integrations.flower.client import client_query
from task import make_task

app = ClientApp()


def _spec(context: Context) -> ClientSpec:
    cfg: Any = context.run_config
    sigma = float(cfg.get("dp-noise-multiplier", 0.0))
    dp = SampleDP(noise_multiplier=sigma, max_grad_norm=float(cfg.get("dp-max-grad-norm", 1.0))) if sigma > 0 else None
    zo = ZOConfig(lr=float(cfg.get("zo-lr", 0.04))) if bool(cfg.get("zo", False)) else None
    return ClientSpec(task=make_task(cfg), optimizer=str(cfg.get("optimizer", "sgd")),
                      local_steps=int(cfg.get("local-steps", 10)), hparams={"lr": float(cfg.get("lr", 0.3))},
                      dp=dp, zo=zo, seed=int(cfg.get("seed", 0)))


@app.train()
def train(message: Message, context: Context) -> Message:
    return client_train(message, context, _spec(context))


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return client_evaluate(message, context, _spec(context))


@app.query()
def query(message: Message, context: Context) -> Message:
    """The server asks every node its partition id once (reproducible sampling and ordering)."""
    return client_query(message, context)
