"""T operator of FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
MLSys 2020, eq. (2)): the gradient of the proximal term ``μ/2 ||w - w^t||²`` that keeps the
client's local model ``w`` close to the global model ``w^t`` received this round,

    g <- g + μ (w - w^t)

As a T operator it enters every recipe exactly where the loss gradient does (before momentum,
moments and preconditioning), which is the same as adding the term to the client's loss.
(Flower's ``FedProx`` docstring example adds ``μ/2 · ||w - w^t||`` without the square; this
operator follows the paper.)
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class ProximalTerm(Operator):
    """``u <- u + μ (p - anchor)``; ``anchor`` maps each parameter (by identity) to ``w^t``."""

    stage = Stage.T

    def __init__(self, mu: float, anchor: Mapping[Tensor, Tensor]) -> None:
        self.mu, self.anchor = mu, anchor

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.mu == 0 or not self.anchor:
            return updates
        pairs = [(i, self.anchor.get(p)) for i, p in enumerate(ctx.params)]
        idx = [i for i, a in pairs if a is not None]
        if not idx:
            return updates
        diff = ctx.ops.sub([ctx.params[i] for i in idx], [a for _, a in pairs if a is not None])
        out = list(updates)
        moved = ctx.ops.add([updates[i] for i in idx], diff, alpha=self.mu)
        for i, t in zip(idx, moved):
            out[i] = t
        return out

    def __repr__(self) -> str:
        return f"ProximalTerm(mu={self.mu}, {len(self.anchor)} tensors)"
