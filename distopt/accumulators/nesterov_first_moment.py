"""Φ operator: the first moment with a Nesterov look-ahead, as in AdamP's ``nesterov`` option
(Heo et al., ICLR 2021; Dozat, "Incorporating Nesterov Momentum into Adam", 2016).

    m <- β m + (1 - β) g;     u <- β m + (1 - β) g    (the look-ahead, a new list)
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class NesterovFirstMoment(Operator):
    """Update ``m`` like :class:`~distopt.accumulators.FirstMoment`, return ``lerp(m, g, 1-β)``."""

    stage = Stage.PHI

    def __init__(self, beta: float, key: str = "exp_avg") -> None:
        self.beta, self.key = beta, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = [s[self.key] for s in ctx.states]
        ctx.ops.lerp_(m, updates, 1.0 - self.beta)
        return ctx.ops.lerp(m, updates, 1.0 - self.beta)
