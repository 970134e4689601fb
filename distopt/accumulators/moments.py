"""Φ operators: exponential moving averages of the update and of its square.

``FirstMoment``:  m_t = β1 m_{t-1} + (1 - β1) u_t       (returns m_t)
``SecondMoment``: v_t = β2 v_{t-1} + (1 - β2) u_t²      (returns u_t unchanged; v_t stays in state)

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015. The buffers use
torch.optim's state keys (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``).
The returned lists are the state buffers themselves: later operators must not modify them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


def bias_correction(beta: float, steps: list[int]) -> list[float]:
    """``1 - beta**t`` for every parameter's step count ``t``."""
    return [1.0 - beta**t for t in steps]


class FirstMoment(Operator):
    """EMA of the update, ``m <- β m + (1 - β) u``; returns ``m``."""

    stage = Stage.PHI

    def __init__(self, beta: float, key: str = "exp_avg") -> None:
        self.beta, self.key = beta, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = [s[self.key] for s in ctx.states]
        ctx.ops.lerp_(m, updates, 1.0 - self.beta)
        return m


class SecondMoment(Operator):
    """EMA of the squared update, ``v <- β v + (1 - β) u²``; with ``amsgrad`` also keeps
    ``v̂ = max(v̂, v)`` (Reddi et al., ICLR 2018). Returns ``u`` unchanged."""

    stage = Stage.PHI

    def __init__(self, beta: float, amsgrad: bool = False, key: str = "exp_avg_sq") -> None:
        self.beta, self.amsgrad, self.key = beta, amsgrad, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        state = {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}
        if self.amsgrad:
            state["max_" + self.key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        v = [s[self.key] for s in ctx.states]
        ctx.ops.mul_(v, self.beta)
        ctx.ops.addcmul_(v, updates, updates, value=1.0 - self.beta)
        if self.amsgrad:
            ctx.ops.maximum_([s["max_" + self.key] for s in ctx.states], v)
        return updates
