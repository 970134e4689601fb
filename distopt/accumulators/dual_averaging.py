"""Φ/P operators of MADGRAD: dual averaging with a cube-root denominator and momentum by
interpolation (Defazio & Jelassi, "A Momentumized, Adaptive, Dual Averaged Gradient Method
for Stochastic Optimization", JMLR 2022 / arXiv:2101.11075, Algorithm 1).

    λ_t = lr · sqrt(t)
    s_t = s_{t-1} + λ_t g_t;        ν_t = ν_{t-1} + λ_t g_t²
    z_t = x_0 - s_t / (ν_t^{1/3} + ε)                       (CubeRootDualAveraging, Φ)
    p_t = (1 - c) p_{t-1} + c z_t,   c = 1 - momentum       (InterpolateParams, P)

With ``momentum == 0`` the anchor ``x_0`` is not stored but recovered as
``p + s_{t-1} / (ν_{t-1}^{1/3} + ε)`` (as the authors' code does), which saves one buffer.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


def _cube_root_denominator(sums: list[Tensor], eps: float, ctx: StepContext) -> list[Tensor]:
    """``ν^{1/3} + ε``; with ``ε = 0`` an all-zero coordinate gets ``inf`` so ``s / rms = 0`` there."""
    rms = ctx.ops.pow(sums, 1.0 / 3.0)
    ctx.ops.add_(rms, eps)
    if eps == 0:
        for r in rms:
            r.masked_fill_(r == 0, math.inf)
    return rms


class CubeRootDualAveraging(Operator):
    """Accumulate ``s`` and ``ν`` with weights ``λ_t = lr·sqrt(t)``; return ``z = x_0 - s / (ν^{1/3}+ε)``.

    State: ``grad_sum_sq`` (ν), ``s`` and, when ``store_anchor``, ``x0`` (the initial parameters).
    """

    stage = Stage.PHI

    def __init__(self, lr: float, eps: float, store_anchor: bool) -> None:
        self.lr, self.eps, self.store_anchor = lr, eps, store_anchor

    def init(self, param: Tensor) -> dict[str, Any]:
        state = {"grad_sum_sq": torch.zeros_like(param), "s": torch.zeros_like(param)}
        if self.store_anchor:
            state["x0"] = param.detach().clone()
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        sums = [st["grad_sum_sq"] for st in ctx.states]
        s = [st["s"] for st in ctx.states]
        if self.store_anchor:
            x0 = [st["x0"] for st in ctx.states]
        else:
            x0 = ctx.ops.addcdiv(ctx.params, s, _cube_root_denominator(sums, self.eps, ctx))
        weighted = ctx.ops.mul(updates, [self.lr * math.sqrt(t) for t in ctx.steps])
        ctx.ops.addcmul_(sums, weighted, updates)
        ctx.ops.add_(s, weighted)
        return ctx.ops.addcdiv(x0, s, _cube_root_denominator(sums, self.eps, ctx), value=-1.0)


class InterpolateParams(Operator):
    """``p <- p + w (u - p)``: move the parameters a fraction ``w`` toward the update (``w = 1``: copy)."""

    stage = Stage.P

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.weight == 1.0:
            for p, u in zip(ctx.params, updates):
                p.copy_(u)
        else:
            ctx.ops.lerp_(ctx.params, updates, self.weight)
        return updates
