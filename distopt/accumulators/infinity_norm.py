"""Φ operator: the exponentially weighted infinity norm of Adamax.

    u_t = max(β2 u_{t-1}, |g_t| + ε)          (returns g_t unchanged; u_t stays in state)

Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015, Section 7.1
(Algorithm 2). ε sits inside the max as in torch.optim.Adamax (the paper has no ε);
the buffer uses torch's key ``exp_inf``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class InfinityNorm(Operator):
    """``u <- max(β2 u, |g| + ε)`` in state ``key``; returns ``g`` unchanged."""

    stage = Stage.PHI

    def __init__(self, beta: float, eps: float, key: str = "exp_inf") -> None:
        self.beta, self.eps, self.key = beta, eps, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        inf = [s[self.key] for s in ctx.states]
        ctx.ops.mul_(inf, self.beta)
        magnitude = ctx.ops.abs(updates)
        ctx.ops.add_(magnitude, self.eps)
        ctx.ops.maximum_(inf, magnitude)
        return updates
