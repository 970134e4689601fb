"""Φ operator: the first moment with a Nesterov look-ahead, as in AdamP's ``nesterov`` option
(Heo et al., ICLR 2021; Dozat, "Incorporating Nesterov Momentum into Adam", 2016).

    m <- β m + (1 - β) g;     u <- β m + (1 - β) g    (the look-ahead, a new list)
"""
from __future__ import annotations

from torch import Tensor

from distopt.accumulators.moments import FirstMoment
from distopt.core.operator import StepContext


class NesterovFirstMoment(FirstMoment):
    """Update ``m`` like :class:`~distopt.accumulators.FirstMoment`, return ``lerp(m, g, 1-β)``."""

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = super().update(updates, ctx)
        return ctx.ops.lerp(m, updates, 1.0 - self.beta)
