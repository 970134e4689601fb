"""P operator: division by the centered root second moment (centered RMSprop).

    u <- u / (sqrt(v - ḡ²) + ε)

with ``v`` the EMA of squared updates (:class:`~distopt.accumulators.SecondMoment`,
``key="square_avg"``) and ``ḡ`` the EMA of updates
(:class:`~distopt.accumulators.centered.SideMean`, ``key="grad_avg"``), so that the
denominator estimates the standard deviation of the gradient instead of its RMS.
Graves, "Generating Sequences With Recurrent Neural Networks", arXiv:1308.0850, 2013, eq. 38-40;
torch.optim.RMSprop(centered=True).
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class CenteredRootPreconditioner(Operator):
    """Divide the update by ``sqrt(v - ḡ²) + ε`` (both read from state)."""

    stage = Stage.P

    def __init__(self, eps: float, key: str = "square_avg", mean_key: str = "grad_avg") -> None:
        self.eps, self.key, self.mean_key = eps, key, mean_key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        mean = [s[self.mean_key] for s in ctx.states]
        denom = ctx.ops.addcmul([s[self.key] for s in ctx.states], mean, mean, value=-1.0)
        ctx.ops.sqrt_(denom)
        ctx.ops.add_(denom, self.eps)
        return ctx.ops.div(updates, denom)
