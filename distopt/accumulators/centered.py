"""Φ operator: an EMA of the update kept on the side (for centered second moments).

    ḡ_t = α ḡ_{t-1} + (1 - α) u_t          (returns u_t unchanged; ḡ_t stays in state)

Used by centered RMSprop (Graves, "Generating Sequences With Recurrent Neural Networks",
arXiv:1308.0850, 2013, eq. 38-40), whose denominator is ``sqrt(E[u²] - E[u]²) + ε``
(:class:`~distopt.preconditioners.centered.CenteredRootPreconditioner`). Unlike
:class:`~distopt.accumulators.FirstMoment`, the update passes through, so a following
preconditioner still sees the raw update. Key ``grad_avg`` follows torch.optim.RMSprop.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class SideMean(Operator):
    """``ḡ <- α ḡ + (1 - α) u`` in state ``key``; returns ``u`` unchanged."""

    stage = Stage.PHI

    def __init__(self, beta: float, key: str = "grad_avg") -> None:
        self.beta, self.key = beta, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        ctx.ops.lerp_([s[self.key] for s in ctx.states], updates, 1.0 - self.beta)
        return updates
