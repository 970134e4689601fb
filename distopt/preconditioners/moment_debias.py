"""P operator: the bias correction of an exponential moving average started at zero.

    u <- u / (1 - β^t)

Kingma & Ba, "Adam", ICLR 2015; used on LaProp's momentum (Ziyin et al., 2020, Algorithm 1).
"""
from __future__ import annotations

from torch import Tensor

from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Operator, Stage, StepContext


class DebiasMoment(Operator):
    """Divide the update by ``1 - β^t`` (a new list)."""

    stage = Stage.P

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        return ctx.ops.div(updates, bias_correction(self.beta, ctx.steps))
