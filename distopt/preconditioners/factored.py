"""P operator: Adafactor's preconditioner from the factored second moment.

    V̂ = R C / max(mean(R), ε1)    (ndim >= 2, rank-1 reconstruction; ``V`` itself for vectors)
    u <- g / sqrt(max(V̂, ε1²))

with ``R``, ``C``, ``V`` read from the state written by
:class:`~distopt.accumulators.factored.FactoredSecondMoment`. ``ε1 = None`` means the machine
epsilon of the parameter's dtype. Shazeer & Stern, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost", ICML 2018, Algorithm 4 (the paper adds ε1 to g² instead; torch.optim.Adafactor,
followed here, clamps the row mean and the estimate). Locality: TENSOR (``mean(R)`` reduces
over all rows).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class FactoredRootPreconditioner(Operator):
    """``g / sqrt(clamp(R C / clamp(mean R, ε1), ε1²))`` (or with the full ``V`` for vectors)."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, eps1: float | None = None) -> None:
        self.eps1 = eps1

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        eps1 = [torch.finfo(p.dtype).eps if self.eps1 is None else self.eps1 for p in ctx.params]
        estimates = []
        for s, e in zip(ctx.states, eps1):
            if "row_var" in s:
                row, col = s["row_var"], s["col_var"]
                estimates.append((row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=e)))
            else:
                estimates.append(s["variance"].clone())
        ctx.ops.clamp_min_(estimates, [e * e for e in eps1])
        ctx.ops.rsqrt_(estimates)
        ctx.ops.mul_(estimates, updates)
        return estimates
