"""Φ operators: the second-moment rules of adaptive federated optimization (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, Algorithm 2), applied by the server to the
pseudo-gradient ``Δ_t`` (the averaged client change) with an initial value ``v_{-1}``
(the paper requires ``v_{-1} >= τ²``):

    FedAdam:    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                    (``EmaSecondMoment``)
    FedYogi:    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)  (``YogiSecondMoment``,
                Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018)
    FedAdagrad: v_t = v_{t-1} + Δ_t²                                (``SumOfSquares``)

Both return the update unchanged and keep ``v`` under ``exp_avg_sq``; a
:class:`~distopt.preconditioners.RootMomentPreconditioner` with ``bias_correct=False`` and
``eps=τ`` then divides by ``sqrt(v_t) + τ`` as in the paper (no bias correction).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class EmaSecondMoment(Operator):
    """``v <- β v + (1 - β) u²`` with ``v`` starting at ``initial``; returns ``u``."""

    stage = Stage.PHI

    def __init__(self, beta: float, initial: float = 0.0, key: str = "exp_avg_sq") -> None:
        self.beta, self.initial, self.key = beta, initial, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.full_like(param, self.initial, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        v = [s[self.key] for s in ctx.states]
        ctx.ops.mul_(v, self.beta)
        ctx.ops.addcmul_(v, updates, updates, value=1.0 - self.beta)
        return updates


class YogiSecondMoment(Operator):
    """``v <- v - (1 - β) u² sign(v - u²)`` with ``v`` starting at ``initial``; returns ``u``."""

    stage = Stage.PHI

    def __init__(self, beta: float, initial: float = 0.0, key: str = "exp_avg_sq") -> None:
        self.beta, self.initial, self.key = beta, initial, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.full_like(param, self.initial, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        v = [s[self.key] for s in ctx.states]
        sq = ctx.ops.mul(updates, updates)
        direction = ctx.ops.sub(v, sq)
        ctx.ops.sign_(direction)
        ctx.ops.mul_(direction, sq)
        ctx.ops.add_(v, direction, alpha=-(1.0 - self.beta))
        return updates
