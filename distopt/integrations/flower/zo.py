"""Zeroth-order federated training: clients upload ``(seed, scalars)``, the server replays.

A step of a zeroth-order recipe of the catalogue (``zo_sgd`` = MeZO, ``zo_adam``,
``zo_sgd_momentum``, ``hizoo``, ``lozo``, ``sparse_mezo``, ...; :mod:`distopt.zo`) is a pure
function of the weights, the optimizer state and ``(seed, step, scalars, lr)``: its directions
are regenerated from counters, never stored. A client therefore trains its ``local_steps`` with
``record=True`` and uploads only

- ``"zo"`` ArrayRecord: ``scalars`` (steps x scalars-per-step, float64) and, for recipes that
  accept or reject steps (``zo_sgd_cons``), ``choices``;
- ``"zo-header"`` ConfigRecord: the recipe's name, its hyperparameters (JSON, the seed and lr
  included), the chunk size (it fixes the floating-point grouping of the update);

about 0.5 KB for 10 steps of MeZO whatever the model size (the model is not sent back). The
server rebuilds the :class:`distopt.zo.ZOLog` and replays it (:func:`distopt.zo.replay`) from the
global weights it sent this round, with a fresh optimizer as the client had: the replayed model is
the client's model, bit for bit (the recipes perturb and restore exactly). Any strategy then
aggregates the replayed models (FedKSeed, Qin et al., ICML 2024, uses the same idea).

Every client and round gets its own seed, ``mix_seed(seed, round, partition, 3)``.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from torch import Tensor

import distopt
from distopt.integrations.flower._deps import option

ZO_RECORD, ZO_HEADER = "zo", "zo-header"


def mix_seed(*parts: int) -> int:
    """A 62-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 2


@dataclass(frozen=True)
class ZOConfig:
    """A zeroth-order client: recipe ``optimizer`` (closure_kind ``"forward"``), its ``lr``,
    perturbation ``eps``, ``n`` directions per step and any other ``hparams`` of the recipe."""

    optimizer: str = "zo_sgd"
    lr: float = 1e-2
    eps: float = 1e-3
    n: int = 1
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        cls = distopt.get(self.optimizer)
        if getattr(cls, "closure_kind", "backward") != "forward":
            zo = [n for n in distopt.available("zeroth_order")]
            raise ValueError(f"zo: {self.optimizer!r} is not a zeroth-order recipe; one of {', '.join(zo)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"zo: lr must be >= 0, got {self.lr}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"zo: eps must be > 0, got {self.eps}")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"zo: n must be an integer >= 1, got {self.n}")
        if "seed" in self.hparams or "record" in self.hparams:
            raise ValueError("zo: seed and record are set by the federated client")

    @classmethod
    def of(cls, value: Any) -> "ZOConfig | None":
        return option(cls, value, "zo")


def make_zo_optimizer(params: Sequence[Tensor], config: ZOConfig, seed: int) -> Any:
    """The client's recording zeroth-order optimizer (one param group)."""
    return distopt.create(config.optimizer, list(params), lr=config.lr, eps=config.eps, n=config.n,
                          seed=int(seed), record=True, **dict(config.hparams))


def encode_log(log: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A :class:`distopt.zo.ZOLog` of one param group -> (arrays, header) for the reply Message."""
    if len(log.groups) != 1:
        raise ValueError("federated ZO: one param group per client")
    steps = log.steps
    seeds = {s.seed for s in steps}
    if len(seeds) > 1 or [s.step for s in steps] != list(range(1, len(steps) + 1)):
        raise ValueError("federated ZO: the log must start at step 1 with one seed")
    width = len(steps[0].scalars) if steps else 1
    arrays = {"scalars": np.array([s.scalars for s in steps], dtype=np.float64).reshape(len(steps), width)}
    if any(s.choice != 1.0 for s in steps):
        arrays["choices"] = np.array([s.choice for s in steps], dtype=np.float64)
    lrs = [s.lr[0] for s in steps]
    if len(set(lrs)) > 1:
        arrays["lr"] = np.array(lrs, dtype=np.float64)
    header = {"optimizer": log.optimizer, "hparams": json.dumps(log.groups[0], separators=(",", ":")),
              "chunk-size": int(log.chunk_size)}
    return arrays, header


def decode_log(arrays: Mapping[str, np.ndarray], header: Mapping[str, Any], shapes: list[list[int]]) -> Any:
    """Rebuild the :class:`distopt.zo.ZOLog` that :func:`encode_log` packed."""
    from distopt.zo.replay import ZOLog, ZOStepRecord

    group = json.loads(str(header["hparams"]))
    scalars = np.asarray(arrays["scalars"], dtype=np.float64)
    choices = arrays.get("choices")
    lrs = arrays.get("lr")
    steps = [ZOStepRecord(step=k + 1, seed=int(group["seed"]), scalars=[float(v) for v in scalars[k]],
                          lr=[float(lrs[k]) if lrs is not None else float(group["lr"])],
                          choice=float(choices[k]) if choices is not None else 1.0)
             for k in range(scalars.shape[0])]
    return ZOLog(str(header["optimizer"]), [group], [len(shapes)], shapes, int(header["chunk-size"]), steps)


def replay_into(params: Sequence[Tensor], arrays: Mapping[str, np.ndarray], header: Mapping[str, Any]) -> None:
    """Replay an uploaded ZO round on ``params`` (holding the weights the client started from)."""
    from distopt.zo import replay

    replay(list(params), decode_log(arrays, header, [list(p.shape) for p in params]))


__all__ = ["ZOConfig", "ZO_HEADER", "ZO_RECORD", "decode_log", "encode_log", "make_zo_optimizer", "mix_seed",
           "replay_into"]
