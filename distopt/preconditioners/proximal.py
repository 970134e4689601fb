"""P operator: proximal (implicit) L2 weight decay, applied after the gradient step.

    p <- p / (1 + lr·wd)

the closed-form proximal step of ``(wd/2)||p||²`` (Xie et al., "Adan", arXiv:2208.06677,
Algorithm 1, last line; the authors' ``no_prox=False`` default).
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class ProximalWeightDecay(Operator):
    """``p <- p / (1 + lr * weight_decay)``; the update passes through unchanged."""

    stage = Stage.P

    def __init__(self, weight_decay: float, lr: float | None = None) -> None:
        self.weight_decay, self.lr = weight_decay, lr

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.weight_decay:
            lr = ctx.group["lr"] if self.lr is None else self.lr
            ctx.ops.div_(ctx.params, 1.0 + lr * self.weight_decay)
        return updates
