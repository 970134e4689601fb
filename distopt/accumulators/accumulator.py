"""Φ operator: the running sum of squared updates of Adagrad.

    G_t = G_{t-1} + u_t ⊙ u_t,   G_0 = initial_accumulator_value      (returns u_t unchanged)

Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and Stochastic
Optimization", JMLR 2011 (diagonal version). The buffer uses torch.optim.Adagrad's key
``sum``; :class:`~distopt.preconditioners.RootMomentPreconditioner` with ``key="sum"`` and
``bias_correct=False`` then divides by ``sqrt(G_t) + ε``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class SumOfSquares(Operator):
    """Accumulate ``G <- G + u²`` in state ``key`` (starting at ``initial``); returns ``u``."""

    stage = Stage.PHI

    def __init__(self, initial: float = 0.0, key: str = "sum") -> None:
        self.initial, self.key = initial, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.full_like(param, self.initial, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        ctx.ops.addcmul_([s[self.key] for s in ctx.states], updates, updates, value=1.0)
        return updates
