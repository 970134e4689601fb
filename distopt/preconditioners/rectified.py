"""P operator: RAdam's variance-rectified Adam preconditioner.

    ρ_∞ = 2 / (1 - β2) - 1,   ρ_t = ρ_∞ - 2 t β2^t / (1 - β2^t)
    r_t = sqrt((ρ_t - 4)(ρ_t - 2) ρ_∞ / ((ρ_∞ - 4)(ρ_∞ - 2) ρ_t))
    u <- m / (1 - β1^t) · r_t · sqrt(1 - β2^t) / (sqrt(v) + ε)     if ρ_t > 5
    u <- m / (1 - β1^t)                                            otherwise (SGD with momentum)

with ``m`` the incoming first moment and ``v`` read from state ``exp_avg_sq``
(:class:`~distopt.accumulators.SecondMoment`). Liu et al., "On the Variance of the Adaptive
Learning Rate and Beyond", ICLR 2020, Algorithm 2; the threshold 5 and the placement of ε
follow torch.optim.RAdam.
"""
from __future__ import annotations

import math

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class RectifiedPreconditioner(Operator):
    """Rectified ``m̂ / (sqrt(v̂) + ε)`` once the SMA length ρ_t exceeds 5, else ``m̂``."""

    stage = Stage.P

    def __init__(self, eps: float, beta1: float, beta2: float, key: str = "exp_avg_sq") -> None:
        self.eps, self.beta1, self.beta2, self.key = eps, beta1, beta2, key

    def rectification(self, t: int) -> float | None:
        """``r_t``, or ``None`` while the variance of the adaptive rate is intractable (ρ_t <= 5)."""
        rho_inf = 2.0 / (1.0 - self.beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * self.beta2**t / (1.0 - self.beta2**t)
        if rho_t <= 5.0:
            return None
        return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        rects = [self.rectification(t) for t in ctx.steps]
        bc1 = [1.0 - self.beta1**t for t in ctx.steps]
        out: list[Tensor | None] = [None] * len(updates)
        plain = [i for i, r in enumerate(rects) if r is None]
        if plain:
            for i, u in zip(plain, ctx.ops.mul([updates[i] for i in plain], [1.0 / bc1[i] for i in plain])):
                out[i] = u
        rect = [i for i, r in enumerate(rects) if r is not None]
        if rect:
            denom = ctx.ops.sqrt([ctx.states[i][self.key] for i in rect])
            ctx.ops.add_(denom, self.eps)
            scaled = ctx.ops.div([updates[i] for i in rect], denom)
            scale = [rects[i] * math.sqrt(1.0 - self.beta2 ** ctx.steps[i]) / bc1[i] for i in rect]
            ctx.ops.mul_(scaled, scale)
            for i, u in zip(rect, scaled):
                out[i] = u
        return out  # type: ignore[return-value]
