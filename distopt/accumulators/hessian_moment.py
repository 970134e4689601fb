"""Φ operator: EMA of the squared Hessian-diagonal estimate (AdaHessian's second moment).

    v_t = β2 v_{t-1} + (1 - β2) D_t ⊙ D_t

with ``D_t`` the estimate a :class:`~distopt.estimators.hutchinson.HutchinsonDiagonal` keeps
under the state key ``hessian`` (re-used between its refreshes, as in the AdaHessian code of
davda54/ada-hessian whose ``update_each`` this follows). Yao et al., "ADAHESSIAN: An Adaptive
Second Order Optimizer for Machine Learning", AAAI 2021, Eq. (10). State key
``exp_hessian_diag_sq`` (the reference code's name). Returns the update unchanged.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class HessianSquareMoment(Operator):
    """``exp_hessian_diag_sq <- β2·exp_hessian_diag_sq + (1-β2)·hessian²``; the update passes."""

    stage = Stage.PHI

    def __init__(self, beta: float, source: str = "hessian", key: str = "exp_hessian_diag_sq") -> None:
        self.beta, self.source, self.key = beta, source, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        v = [s[self.key] for s in ctx.states]
        d = [s[self.source] for s in ctx.states]
        ctx.ops.mul_(v, self.beta)
        ctx.ops.addcmul_(v, d, d, value=1.0 - self.beta)
        return updates
