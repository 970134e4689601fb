"""P operator: the parameter step with Adagrad's per-step learning-rate decay.

    p <- p - lr / (1 + (t - 1)·lr_decay) · u

torch.optim.Adagrad's ``lr_decay`` (the inverse-time decay of the Torch7 ``optim`` package);
with ``lr_decay = 0`` this is :class:`~distopt.preconditioners.ApplyLR`. ``t`` is each
parameter's own step count. Reads ``lr`` from the param group when not given.
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class ApplyDecayedLR(Operator):
    """``p <- p - lr / (1 + (t - 1) lr_decay) * u`` (a final operator)."""

    stage = Stage.P

    def __init__(self, lr: float | None = None, lr_decay: float = 0.0) -> None:
        self.lr, self.lr_decay = lr, lr_decay

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        lr = ctx.group["lr"] if self.lr is None else self.lr
        if self.lr_decay == 0:
            ctx.ops.add_(ctx.params, updates, alpha=-lr)
            return updates
        step = ctx.ops.mul(updates, [-lr / (1.0 + (t - 1) * self.lr_decay) for t in ctx.steps])
        ctx.ops.add_(ctx.params, step)
        return updates
