"""E/T operators of MARS (Yuan et al., "MARS: Unleashing the Power of Variance Reduction for
Training Large Models", arXiv:2411.10438, Algorithm 2 / MARS-AdamW, approximate variant).

``MarsCorrection`` (E): the variance-reduced gradient estimate with the previous stochastic
gradient standing in for the same-batch gradient at the previous iterate,

    c_t = g_t + γ · β1 / (1 - β1) · (g_t - g_{t-1}),     g_0 = 0 (as the authors' code)

``ClipTensorNorm`` (T): ``c <- c / max(1, ||c|| / max_norm)`` per tensor (MARS clips each
tensor's ``c_t`` to norm 1); it needs a whole-tensor reduction, hence ``TENSOR`` locality.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class MarsCorrection(Operator):
    """``c = g + scale·(g - g_prev)`` with ``scale = γ β1/(1-β1)``; keeps ``last_grad`` in state."""

    stage = Stage.E

    def __init__(self, gamma: float, beta1: float) -> None:
        self.gamma, self.beta1 = gamma, beta1

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"last_grad": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        last = [s["last_grad"] for s in ctx.states]
        corrected = ctx.ops.sub(updates, last)
        ctx.ops.mul_(corrected, self.gamma * self.beta1 / (1.0 - self.beta1))
        ctx.ops.add_(corrected, updates)
        ctx.ops.copy_(last, updates)
        return corrected


class ClipTensorNorm(Operator):
    """Rescale each tensor to L2 norm at most ``max_norm``: ``u <- u · min(1, max_norm / ||u||)``."""

    stage = Stage.T
    locality = Locality.TENSOR

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        norms = ctx.ops.norm(updates)
        ctx.ops.div_(norms, self.max_norm)
        ctx.ops.clamp_min_(norms, 1.0)
        return ctx.ops.div(updates, norms)
