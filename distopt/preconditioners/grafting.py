"""Grafting (Agarwal et al., "Disentangling Adaptive Gradient Methods from Learning Rates", 2020;
Anil et al., "Scalable Second Order Optimization for Deep Learning", 2020): a diagonal method whose
per-block step *size* Shampoo borrows, keeping its own *direction*.

``GraftingAccumulator`` (Φ) keeps the diagonal statistic of the raw gradient g:

    "adagrad":          a <- a + g²                       (key ``grafting_sum``)
    "rmsprop", "adam":  a <- β a + (1 - β) g²             (key ``grafting_exp_avg_sq``)
    "sgd", "none":      no state

:func:`grafting_direction` turns the (filtered, bias-corrected) gradient m̂ into the grafting
direction D (Distributed Shampoo's grafting configs, same ε placement):

    "sgd", "none":  D = m̂
    "adagrad":      D = m̂ / (sqrt(a) + ε)
    "rmsprop":      D = m̂ / (sqrt(a) + ε)
    "adam":         D = m̂ / (sqrt(a / (1 - β^t)) + ε)      (no bias correction if not asked)
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext

GRAFTING = ("none", "sgd", "adagrad", "rmsprop", "adam")
_KEY = {"adagrad": "grafting_sum", "rmsprop": "grafting_exp_avg_sq", "adam": "grafting_exp_avg_sq"}


def _accumulator(state: dict, key: str, param: Tensor) -> Tensor:
    if key not in state:  # the group's grafting kind was changed after the first step
        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state[key]


class GraftingAccumulator(Operator):
    """Accumulate the grafting method's diagonal second moment of ``u``; returns ``u``."""

    stage = Stage.PHI

    def __init__(self, kind: str, beta2: float) -> None:
        self.kind, self.beta2 = kind, beta2

    def init(self, param: Tensor) -> dict[str, Tensor]:
        key = _KEY.get(self.kind)
        return {key: torch.zeros_like(param, memory_format=torch.preserve_format)} if key else {}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        key = _KEY.get(self.kind)
        if key is None:
            return updates
        acc = [_accumulator(s, key, p) for s, p in zip(ctx.states, ctx.params)]
        if self.kind == "adagrad":
            ctx.ops.addcmul_(acc, updates, updates, value=1.0)
        else:
            ctx.ops.mul_(acc, self.beta2)
            ctx.ops.addcmul_(acc, updates, updates, value=1.0 - self.beta2)
        return updates


def grafting_direction(kind: str, updates: list[Tensor], ctx: StepContext, eps: float, beta2: float,
                       bias_correction: bool) -> list[Tensor]:
    """The grafting direction of ``updates`` (``updates`` itself for "sgd" and "none")."""
    key = _KEY.get(kind)
    if key is None:
        return updates
    acc = [_accumulator(s, key, p) for s, p in zip(ctx.states, ctx.params)]
    if kind == "adam" and bias_correction:
        denom = ctx.ops.div(acc, [1.0 - beta2**t for t in ctx.steps])
        ctx.ops.sqrt_(denom)
    else:
        denom = ctx.ops.sqrt(acc)
    ctx.ops.add_(denom, eps)
    return ctx.ops.div(updates, denom)
