"""Φ operator: Muon's momentum, as torch.optim.Muon (an EMA with a Nesterov look-ahead).

    B <- μ B + (1 - μ) g;     u <- g + μ (B - g)  (nesterov)   or   u <- B

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024. Buffer key
``momentum_buffer`` (torch's). The same lerp calls as torch, so float rounding matches too.
"""
from __future__ import annotations

from torch import Tensor

from distopt.accumulators.moments import FirstMoment
from distopt.core.operator import StepContext


class MuonMomentum(FirstMoment):
    """:class:`~distopt.accumulators.FirstMoment` on ``momentum_buffer``; with ``nesterov``
    returns the new list ``lerp(g, B, μ)``, else the buffer itself."""

    def __init__(self, momentum: float, nesterov: bool = True) -> None:
        super().__init__(momentum, key="momentum_buffer")
        self.nesterov = nesterov

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        buf = super().update(updates, ctx)
        return ctx.ops.lerp(updates, buf, self.beta) if self.nesterov else buf
