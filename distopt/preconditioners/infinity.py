"""P operator: Adamax's division by the exponentially weighted infinity norm.

    u <- m / ((1 - β1^t) · u_inf)

with ``m`` the incoming first moment and ``u_inf`` read from the state key written by
:class:`~distopt.accumulators.infinity_norm.InfinityNorm` (no second bias correction is
needed for the max-norm). Kingma & Ba, "Adam: A Method for Stochastic Optimization",
ICLR 2015, Algorithm 2.
"""
from __future__ import annotations

from torch import Tensor

from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Operator, Stage, StepContext


class InfinityNormPreconditioner(Operator):
    """Divide the bias-corrected first moment by ``exp_inf``."""

    stage = Stage.P

    def __init__(self, beta1: float, key: str = "exp_inf") -> None:
        self.beta1, self.key = beta1, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denom = ctx.ops.mul([s[self.key] for s in ctx.states], bias_correction(self.beta1, ctx.steps))
        return ctx.ops.div(updates, denom)
