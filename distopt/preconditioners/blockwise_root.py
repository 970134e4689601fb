"""P operator: divide by the root of a block-wise second moment (Adam-mini).

    u <- (m / (1 - β1^t)) / (sqrt(v_b / (1 - β2^t)) + ε)      for every entry of block b

with ``v_b`` read from the state written by
:class:`~distopt.accumulators.blockwise_moment.BlockwiseSecondMoment` (one scalar per block,
broadcast over the block). As in :class:`~distopt.preconditioners.RootMomentPreconditioner`
the bias corrections are folded into the (small) denominator,
``u = m / (c1 sqrt(v_b) / sqrt(c2) + c1 ε)``, so the step costs one new full-size list.

Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv:2406.16793 (2024),
Algorithm 1. Locality: TENSOR (a block spans a whole row or the whole tensor).
"""
from __future__ import annotations

import math

from torch import Tensor

from distopt.accumulators.blockwise_moment import block_view
from distopt.accumulators.moments import bias_correction
from distopt.core.operator import Locality, Operator, Stage, StepContext


class BlockwiseRootPreconditioner(Operator):
    """Divide the update by ``sqrt(v̂_b) + ε``, ``v_b`` broadcast over its block (a new list)."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, eps: float, beta1: float, beta2: float, key: str = "vmean") -> None:
        self.eps, self.beta1, self.beta2, self.key = eps, beta1, beta2, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        denom = ctx.ops.sqrt([s[self.key] for s in ctx.states])
        c1 = bias_correction(self.beta1, ctx.steps) if self.beta1 else [1.0] * len(updates)
        c2 = bias_correction(self.beta2, ctx.steps)
        ctx.ops.mul_(denom, [a / math.sqrt(b) for a, b in zip(c1, c2)])
        ctx.ops.add_(denom, [a * self.eps for a in c1])
        return ctx.ops.div(updates, [block_view(d, p) for d, p in zip(denom, ctx.params)])
