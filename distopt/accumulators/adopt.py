"""Φ/P operators of ADOPT (Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any β2
with the Optimal Rate", NeurIPS 2024, Algorithm 2 with clipping).

The first call only initialises ``v_0 = g_0²``; afterwards, with paper step ``t = step - 1``,

    m <- β1 m + (1-β1) clip(g / max(sqrt(v), ε), t^e)        (normalise by the OLD v)
    v <- β2 v + (1-β2) g²                                     (second moment updated after)

and the returned update is ``m`` (zero on the first call, so the parameters do not move).
``clip_exponent=None`` disables clipping (Algorithm 1); the paper uses ``e = 1/4``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class AdoptMoments(Operator):
    """ADOPT's ``exp_avg`` of the normalised gradient and its delayed ``exp_avg_sq``; returns ``m``."""

    stage = Stage.PHI

    def __init__(self, beta1: float, beta2: float, eps: float, clip_exponent: float | None) -> None:
        self.beta1, self.beta2, self.eps, self.clip_exponent = beta1, beta2, eps, clip_exponent

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = [s["exp_avg"] for s in ctx.states]
        v = [s["exp_avg_sq"] for s in ctx.states]
        first = [i for i, t in enumerate(ctx.steps) if t == 1]
        later = [i for i, t in enumerate(ctx.steps) if t > 1]
        for i in first:
            v[i].addcmul_(updates[i], updates[i])
        if later:
            g, mm, vv = [updates[i] for i in later], [m[i] for i in later], [v[i] for i in later]
            denom = ctx.ops.sqrt(vv)
            ctx.ops.clamp_min_(denom, self.eps)
            normed = ctx.ops.div(g, denom)
            if self.clip_exponent is not None:
                bounds = [float(ctx.steps[i] - 1) ** self.clip_exponent for i in later]
                ctx.ops.clamp_min_(normed, [-b for b in bounds])
                ctx.ops.clamp_max_(normed, bounds)
            ctx.ops.lerp_(mm, normed, 1.0 - self.beta1)
            ctx.ops.mul_(vv, self.beta2)
            ctx.ops.addcmul_(vv, g, g, value=1.0 - self.beta2)
        return m


class DelayedDecoupledWeightDecay(Operator):
    """``p <- p (1 - lr·wd)`` only for parameters at step ``>= start`` (ADOPT decays from its
    first real update on, not on the call that only initialises ``v_0``)."""

    stage = Stage.P

    def __init__(self, weight_decay: float, lr: float, start: int = 2) -> None:
        self.weight_decay, self.lr, self.start = weight_decay, lr, start

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.weight_decay:
            params = [p for p, t in zip(ctx.params, ctx.steps) if t >= self.start]
            ctx.ops.mul_(params, 1.0 - self.lr * self.weight_decay)
        return updates
