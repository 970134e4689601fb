"""Φ operator: heavy-ball momentum with dampening and Nesterov, as torch.optim.SGD.

    b_1 = u_1,  b_t = μ b_{t-1} + (1 - τ) u_t;     u <- u + μ b_t (Nesterov) or u <- b_t

Polyak (1964); Sutskever et al., "On the importance of initialization and momentum in deep
learning", ICML 2013 (Nesterov form).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class HeavyBall(Operator):
    """SGD momentum buffer ``momentum_buffer`` (torch's key); no state when ``momentum == 0``."""

    stage = Stage.PHI

    def __init__(self, momentum: float, dampening: float = 0.0, nesterov: bool = False) -> None:
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros_like(param)} if self.momentum else {}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.momentum == 0:
            return updates
        bufs = [s["momentum_buffer"] for s in ctx.states]
        first = [i for i, t in enumerate(ctx.steps) if t == 1]
        later = [i for i, t in enumerate(ctx.steps) if t > 1]
        for i in first:
            bufs[i].copy_(updates[i])
        if later:
            b, u = [bufs[i] for i in later], [updates[i] for i in later]
            ctx.ops.mul_(b, self.momentum)
            ctx.ops.add_(b, u, alpha=1.0 - self.dampening)
        if self.nesterov:
            return ctx.ops.add(updates, bufs, alpha=self.momentum)
        return bufs
