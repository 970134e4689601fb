"""P operator: diagonal preconditioning by the root of a second-moment estimate (Adam).

    u <- (m / (1 - β1^t)) / (sqrt(v / (1 - β2^t)) + ε)

with ``m`` the incoming update and ``v`` read from the state key written by
:class:`~distopt.accumulators.SecondMoment` (``max_exp_avg_sq`` with AMSGrad). The bias
corrections are folded into the denominator, ``u = m / (c1 sqrt(v)/sqrt(c2) + c1 ε)``, so
the step costs one new list (Kingma & Ba, ICLR 2015, Algorithm 1).
"""
from __future__ import annotations

import math

from torch import Tensor

from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Operator, Stage, StepContext


class RootMomentPreconditioner(Operator):
    """Divide the update by ``sqrt(v̂) + ε`` with optional Adam bias corrections."""

    stage = Stage.P

    def __init__(
        self, eps: float, beta1: float = 0.0, beta2: float = 0.0, key: str = "exp_avg_sq", bias_correct: bool = True
    ) -> None:
        self.eps, self.beta1, self.beta2, self.key, self.bias_correct = eps, beta1, beta2, key, bias_correct

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denom = ctx.ops.sqrt([s[self.key] for s in ctx.states])
        if self.bias_correct:
            c1 = bias_correction(self.beta1, ctx.steps) if self.beta1 else [1.0] * len(updates)
            c2 = bias_correction(self.beta2, ctx.steps)
            ctx.ops.mul_(denom, [a / math.sqrt(b) for a, b in zip(c1, c2)])
            ctx.ops.add_(denom, [a * self.eps for a in c1])
        else:
            ctx.ops.add_(denom, self.eps)
        return ctx.ops.div(updates, denom)
