"""P operator: the elementwise sign of the update (signSGD, Lion).

    u <- sign(u)

Bernstein et al., "signSGD: Compressed Optimisation for Non-Convex Problems", ICML 2018;
Chen et al., "Symbolic Discovery of Optimization Algorithms" (Lion), NeurIPS 2023.
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class Sign(Operator):
    """``u <- sign(u)`` (a new list; zero stays zero)."""

    stage = Stage.P

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        return ctx.ops.sign(updates)
