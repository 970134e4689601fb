"""P operators that divide by a Hessian-diagonal estimate: AdaHessian's power and Sophia's clip.

``HessianPowerPreconditioner`` (Yao et al., "ADAHESSIAN", AAAI 2021, Eq. (10)-(11)):

    u <- (m / (1 - β1^t)) / ((v / (1 - β2^t))^(k/2) + ε)

with ``m`` the incoming (first-moment) update, ``v`` the state key ``exp_hessian_diag_sq`` and k
the ``hessian_power`` (k = 1: the root of the squared-Hessian EMA, like Adam's root).

``ClippedHessianPreconditioner`` (Liu et al., "Sophia: A Scalable Stochastic Second-order
Optimizer for Language Model Pre-training", ICLR 2024, Algorithm 3, line 11):

    u <- clip(m / max(ρ·h, ε), 1)          (clip(z, 1) = max(min(z, 1), -1), elementwise)

with ``h`` the state key ``hessian`` (the EMA of the Hessian-diagonal estimates) and ρ the
paper's γ. A non-positive curvature estimate falls back to ε, i.e. to a sign step of size 1.
"""
from __future__ import annotations

from torch import Tensor

from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Operator, Stage, StepContext


class HessianPowerPreconditioner(Operator):
    """Divide the update by the bias-corrected ``v^(k/2) + ε`` (AdaHessian)."""

    stage = Stage.P

    def __init__(self, eps: float, beta1: float, beta2: float, power: float = 1.0,
                 key: str = "exp_hessian_diag_sq") -> None:
        self.eps, self.beta1, self.beta2, self.power, self.key = eps, beta1, beta2, power, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denom = ctx.ops.div([s[self.key] for s in ctx.states], bias_correction(self.beta2, ctx.steps))
        ctx.ops.pow_(denom, self.power / 2.0)
        ctx.ops.add_(denom, self.eps)
        out = ctx.ops.div(updates, denom)
        ctx.ops.div_(out, bias_correction(self.beta1, ctx.steps))
        return out


class ClippedHessianPreconditioner(Operator):
    """``u <- clip(u / max(ρ·h, ε), 1)`` (Sophia)."""

    stage = Stage.P

    def __init__(self, rho: float, eps: float, key: str = "hessian") -> None:
        self.rho, self.eps, self.key = rho, eps, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denom = ctx.ops.mul([s[self.key] for s in ctx.states], self.rho)
        ctx.ops.clamp_min_(denom, self.eps)
        out = ctx.ops.div(updates, denom)
        ctx.ops.clamp_min_(out, -1.0)
        ctx.ops.clamp_max_(out, 1.0)
        return out
