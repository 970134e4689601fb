"""Φ operator of Adan (Xie et al., "Adan: Adaptive Nesterov Momentum Algorithm for Faster
Optimizing Deep Models", arXiv:2208.06677 / TPAMI 2024, Algorithm 1, in the authors' code's
convention β = 1 - β_paper, with their bias corrections):

    d_t = g_t - g_{t-1}                (d_1 = 0)
    m <- β1 m + (1-β1) g;   v <- β2 v + (1-β2) d;   n <- β3 n + (1-β3) (g + β2 d)²
    u = m / (1-β1^t) + β2 · v / (1-β2^t)

``n`` stays in ``exp_avg_sq`` for a root preconditioner (bias ``1-β3^t``); returns ``u``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Operator, Stage, StepContext


class AdanMoments(Operator):
    """Adan's three moments ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq`` and ``previous_grad``."""

    stage = Stage.PHI

    def __init__(self, beta1: float, beta2: float, beta3: float) -> None:
        self.beta1, self.beta2, self.beta3 = beta1, beta2, beta3

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {key: torch.zeros_like(param) for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad")}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m, v, n, prev = ([s[k] for s in ctx.states] for k in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "previous_grad"))
        for i, t in enumerate(ctx.steps):
            if t == 1:  # g_0 := g_1, so the first difference is zero
                prev[i].copy_(updates[i])
        diff = ctx.ops.sub(updates, prev)
        ctx.ops.lerp_(m, updates, 1.0 - self.beta1)
        ctx.ops.lerp_(v, diff, 1.0 - self.beta2)
        ctx.ops.mul_(diff, self.beta2)
        ctx.ops.add_(diff, updates)
        ctx.ops.mul_(n, self.beta3)
        ctx.ops.addcmul_(n, diff, diff, value=1.0 - self.beta3)
        ctx.ops.copy_(prev, updates)
        out = ctx.ops.div(m, bias_correction(self.beta1, ctx.steps))
        c2 = bias_correction(self.beta2, ctx.steps)
        ctx.ops.add_(out, ctx.ops.mul(v, [self.beta2 / c for c in c2]))
        return out
