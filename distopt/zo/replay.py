"""The seed-replay log: a zeroth-order run as ``(seed, step, scalars, lr)`` per step.

A ZO step is a pure function of the parameters, the optimizer state and ``(seed, step,
scalars, lr)``: the directions are regenerated from the seed. Recording those few numbers per
step (``record=True``) gives a log from which :func:`replay` rebuilds the weights, bit-exact on
the same device, from the initial weights alone: a kilobyte-size checkpoint, a federated upload,
an audit trail.

Size: a record holds ``step`` and ``seed`` (2 x 8 bytes), the scalars (8 bytes each: n for
zo_sgd / sign / momentum / adam / lozo / sparse_mezo, 2n for hizoo, n + 1 for zo_sgd_cons with
the accepted direction) and one lr per param group (8 bytes): **16 + 8·(scalars + groups)
bytes** in binary, 32 bytes a step for MeZO with n = 1 and one group. As JSON (``to_json``,
floats written with Python's shortest round-trip repr, so the replay stays bit-exact) a record is
about 80-120 bytes; :meth:`ZOLog.bytes_per_step` reports both.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import Tensor


@dataclass
class ZOStepRecord:
    """One step: its number, seed, the (all-reduced) scalars and the lr of each param group.
    ``choice`` is the conservative recipe's accepted direction (+1, -1, or 0 = rejected)."""

    step: int
    seed: int
    scalars: list[float]
    lr: list[float]
    choice: float = 1.0


@dataclass
class ZOLog:
    """Everything :func:`replay` needs: the recipe, its param-group layout and hyperparameters,
    the chunk size (it fixes the floating-point grouping of the update), and the steps."""

    optimizer: str
    groups: list[dict[str, Any]]
    sizes: list[int]
    shapes: list[list[int]]
    chunk_size: int
    steps: list[ZOStepRecord] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ZOLog":
        data = json.loads(text)
        steps = [ZOStepRecord(**s) for s in data.pop("steps")]
        return cls(**data, steps=steps)

    def bytes_per_step(self) -> dict[str, float]:
        """Binary size of one record (16 + 8 per scalar and per lr) and the measured JSON size."""
        if not self.steps:
            return {"binary": 0.0, "json": 0.0}
        binary = sum(16 + 8 * (len(s.scalars) + len(s.lr) + (s.choice != 1.0)) for s in self.steps) / len(self.steps)
        js = sum(len(json.dumps(asdict(s))) for s in self.steps) / len(self.steps)
        return {"binary": binary, "json": js}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def header(optimizer: Any) -> ZOLog:
    """An empty log describing ``optimizer``'s recipe and param groups."""
    groups, sizes, shapes = [], [], []
    for group in optimizer.param_groups:
        groups.append({k: _jsonable(v) for k, v in group.items() if k != "params"})
        sizes.append(len(group["params"]))
        shapes += [list(p.shape) for p in group["params"]]
    return ZOLog(type(optimizer).name, groups, sizes, shapes, optimizer.chunk_size)


def replay(model_or_params: torch.nn.Module | Iterable[Tensor], log: ZOLog | str) -> Any:
    """Rebuild the weights of a logged run: ``model_or_params`` must hold the *initial* weights
    (the same parameters, in the same order, as the logged optimizer was given); they are updated
    in place step by step. Returns the optimizer (its state is the logged run's final state)."""
    import distopt

    if isinstance(log, str):
        log = ZOLog.from_json(log)
    params = list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params)
    if [list(p.shape) for p in params] != log.shapes:
        raise ValueError("replay: the parameters do not match the log's shapes; pass the same parameters, "
                         "in the same order, as the logged optimizer was given")
    groups, start = [], 0
    cls = distopt.get(log.optimizer)
    spec = cls.hyperparameters()
    for hp, size in zip(log.groups, log.sizes):
        hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hp.items() if k in spec}
        groups.append({"params": params[start:start + size], **hp})
        start += size
    opt = cls(groups, chunk_size=log.chunk_size)
    for record in log.steps:
        opt.replay_step(record)
    return opt


__all__ = ["ZOLog", "ZOStepRecord", "header", "replay"]
