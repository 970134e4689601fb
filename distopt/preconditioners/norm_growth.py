"""P operator: the norm-growth limiter of Fira (Chen et al., "Fira: Can We Achieve Full-rank
Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623, 2024), used by APOLLO
(Zhu et al., MLSys 2025) on its scaled gradient:

    if ||u_t|| > γ ||u_{t-1}||:   u_t <- u_t · γ ||u_{t-1}|| / ||u_t||
    state: ||u_t|| after limiting (``scaled_grad_norm``, 0-dim, param's dtype)

The first step (stored norm 0) is never limited; so a tensor whose first update is zero is
not frozen at zero forever, as the literal rule would do. Computed with ``torch.where``
(no host synchronisation). Locality: TENSOR (a whole-tensor norm).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class NormGrowthLimiter(Operator):
    """Cap the growth of ``||u||`` between consecutive steps at the factor ``gamma`` (new tensors)."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, gamma: float = 1.01, key: str = "scaled_grad_norm") -> None:
        self.gamma, self.key = gamma, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros((), dtype=param.dtype, device=param.device)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        out = []
        for u, state in zip(updates, ctx.states):
            norm = torch.linalg.vector_norm(u)  # one kernel on both routes: the branch is discontinuous
            prev = state[self.key]
            cap = prev * self.gamma
            factor = torch.where((prev > 0) & (norm > cap), cap / norm, torch.ones_like(norm))
            state[self.key].copy_(norm * factor)
            out.append(u * factor)
        return out
