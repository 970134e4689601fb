"""Φ operator: NovoGrad's layer-wise second moment and normalised gradient (Ginsburg et al.,
"Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep Networks",
2019, Algorithm 1).

    v_1 = ||g_1||²,   v_t = β2 v_{t-1} + (1 - β2) ||g_t||²     (one scalar per tensor)
    u <- g / (sqrt(v_t) + ε) + wd · p                          (coupled decay, after normalising)

The scalar ``v`` is kept as a 0-dim tensor under ``grads_ema`` (pytorch_optimizer's key).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class LayerwiseNormalize(Operator):
    """Divide each tensor's update by the root of an EMA of its squared norm (a new list)."""

    stage = Stage.PHI
    locality = Locality.TENSOR

    def __init__(self, beta2: float, eps: float, weight_decay: float = 0.0, key: str = "grads_ema") -> None:
        self.beta2, self.eps, self.weight_decay, self.key = beta2, eps, weight_decay, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros((), dtype=param.dtype, device=param.device)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denoms = []
        for norm, state, step in zip(ctx.ops.norm(updates), ctx.states, ctx.steps):
            v = state[self.key]
            if step == 1:
                v.copy_(norm * norm)
            else:
                v.lerp_(norm * norm, 1.0 - self.beta2)
            denoms.append(v.sqrt() + self.eps)
        out = ctx.ops.div(updates, denoms)
        if self.weight_decay:
            ctx.ops.add_(out, ctx.params, alpha=self.weight_decay)
        return out
