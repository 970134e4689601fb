"""Φ operator: Lion's two-rate momentum (Chen et al., "Symbolic Discovery of Optimization
Algorithms", NeurIPS 2023, Algorithm 2).

    c = β1 m + (1 - β1) g        (returned: the interpolation the update is taken from)
    m <- β2 m + (1 - β2) g       (stored under ``exp_avg``)

The sign is a separate P operator (:class:`distopt.preconditioners.sign.Sign`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class LionMomentum(Operator):
    """Return ``β1 m + (1-β1) g`` (a new list) and update ``m <- β2 m + (1-β2) g``."""

    stage = Stage.PHI

    def __init__(self, beta1: float, beta2: float, key: str = "exp_avg") -> None:
        self.beta1, self.beta2, self.key = beta1, beta2, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = [s[self.key] for s in ctx.states]
        c = ctx.ops.mul(m, self.beta1)
        ctx.ops.add_(c, updates, alpha=1.0 - self.beta1)
        ctx.ops.mul_(m, self.beta2)
        ctx.ops.add_(m, updates, alpha=1.0 - self.beta2)
        return c
