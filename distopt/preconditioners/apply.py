"""The last P operators: decoupled weight decay and the learning-rate step on the parameters.

``DecoupledWeightDecay``: p <- p (1 - lr·wd)  (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", ICLR 2019; torch.optim.AdamW's convention of scaling wd by lr).
``ApplyLR``: p <- p - lr·u. Both read ``lr`` from the param group when not given, so a
user's own chain follows LR schedulers.
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class DecoupledWeightDecay(Operator):
    """``p <- p * (1 - lr * weight_decay)``; the update passes through unchanged."""

    stage = Stage.P

    def __init__(self, weight_decay: float, lr: float | None = None) -> None:
        self.weight_decay, self.lr = weight_decay, lr

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.weight_decay:
            lr = ctx.group["lr"] if self.lr is None else self.lr
            ctx.ops.mul_(ctx.params, 1.0 - lr * self.weight_decay)
        return updates


class ApplyLR(Operator):
    """``p <- p - lr * u`` (the final operator of a recipe)."""

    stage = Stage.P

    def __init__(self, lr: float | None = None) -> None:
        self.lr = lr

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        lr = ctx.group["lr"] if self.lr is None else self.lr
        ctx.ops.add_(ctx.params, updates, alpha=-lr)
        return updates
