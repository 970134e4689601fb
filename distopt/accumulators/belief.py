"""Φ operator: AdaBelief's "belief" second moment, the EMA of the squared deviation of the
gradient from its own EMA (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the
Belief in Observed Gradients", NeurIPS 2020, Algorithm 2).

    m' = β1 m + (1 - β1) g        (m read from the first-moment buffer, not modified here)
    s <- β2 s + (1 - β2) (g - m')² + ε;     ŝ = max(ŝ, s) with AMSGrad

Place it *before* :class:`~distopt.accumulators.FirstMoment` (same β1 and key): it computes
``m'`` exactly as that operator will. Returns ``g`` unchanged; ``s`` stays in state under
``exp_avg_var`` (``max_exp_avg_var`` with AMSGrad), the keys of the authors' code.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class BeliefMoment(Operator):
    """EMA of ``(g - m_t)² + ε``, with ``m_t`` the first moment after this step's update."""

    stage = Stage.PHI

    def __init__(
        self, beta1: float, beta2: float, eps: float, amsgrad: bool = False,
        key: str = "exp_avg_var", first_moment_key: str = "exp_avg",
    ) -> None:
        self.beta1, self.beta2, self.eps, self.amsgrad = beta1, beta2, eps, amsgrad
        self.key, self.first_moment_key = key, first_moment_key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        state = {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}
        if self.amsgrad:
            state["max_" + self.key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m_next = ctx.ops.lerp([s[self.first_moment_key] for s in ctx.states], updates, 1.0 - self.beta1)
        residual = ctx.ops.sub(updates, m_next)
        s = [st[self.key] for st in ctx.states]
        ctx.ops.mul_(s, self.beta2)
        ctx.ops.addcmul_(s, residual, residual, value=1.0 - self.beta2)
        ctx.ops.add_(s, self.eps)
        if self.amsgrad:
            ctx.ops.maximum_([st["max_" + self.key] for st in ctx.states], s)
        return updates
