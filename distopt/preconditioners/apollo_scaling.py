"""P operator: APOLLO's approximated gradient scaling (Zhu et al., "APOLLO: SGD-like Memory,
AdamW-level Performance", MLSys 2025, arXiv:2412.05270, Algorithm 1, steps 1-3).

For a matrix gradient G (the (m, n) view of a tensor with ndim >= 2), r = min(rank, m, n),
side by ``proj_type`` as in :mod:`distopt.scenarios.low_rank` ("std": left if m < n):

    P ~ N(0, 1/r)       left: (m, r), R = Pᵀ G (r, n);   right: (r, n), R = G Pᵀ (m, r)
    M <- β1 M + (1-β1) R;   V <- β2 V + (1-β2) R²;   R̃ = (M / (1-β1^t)) / (sqrt(V / (1-β2^t)) + ε)
    channel-wise: s_j = ||R̃_j|| / ||R_j|| per column j (left) or row j (right) of the low-rank
                  matrices, i.e. per channel of G along its un-projected side;
    tensor-wise:  s = ||R̃||_F / ||R||_F  (APOLLO-Mini)
    u = G · diag(s)   (columns of G scaled by s for left, rows for right; a new tensor)

with s = 0 where ||R|| = 0 (the paper has no guard; the authors' code adds 1e-8 to ||R||).
P is never stored: it is regenerated at every step from a seed that changes every
``update_proj_gap`` steps, ``projection_seed(seed, i, (t - 1) // T)`` with i the param's
position in its param group, drawn in float32 by ``torch.randn`` with a generator on the
param's device (so P is the same for every dtype, and the same on every rank of one device
type), divided by sqrt(r) and cast to the param's dtype. State: ``exp_avg``, ``exp_avg_sq`` of
R's shape in the param's dtype. Locality: MATRIX.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.scenarios.low_rank import effective_rank, low_rank_shape, project, projection_side, projector_shape

_MASK = (1 << 64) - 1


def projection_seed(seed: int, index: int, window: int) -> int:
    """A 64-bit generator seed for (user seed, param index, projection window) (splitmix64 mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xBF58476D1CE4E5B9 + (window + 1) * 0x94D049BB133111EB) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def random_projector(shape: tuple[int, int], rank: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """P ~ N(0, 1/rank) of ``shape``, drawn in float32 from ``seed`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(rank)
    return p.to(dtype)


class ApolloScaling(Operator):
    """``u = G · diag(s)`` with s the channel-wise (or tensor-wise) ratio of the low-rank Adam
    direction's norm to the projected gradient's norm."""

    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, beta1: float, beta2: float, eps: float, rank: int, update_proj_gap: int,
                 proj_type: str = "std", seed: int = 0, channelwise: bool = True) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.rank, self.update_proj_gap, self.proj_type = rank, update_proj_gap, proj_type
        self.seed, self.channelwise = seed, channelwise

    def init(self, param: Tensor) -> dict[str, Tensor]:
        shape = low_rank_shape(param.shape, self.rank, self.proj_type)
        return {k: torch.zeros(shape, dtype=param.dtype, device=param.device) for k in ("exp_avg", "exp_avg_sq")}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        position = {id(p): i for i, p in enumerate(ctx.group["params"])}
        out = []
        for g, p, state, t in zip(updates, ctx.params, ctx.states, ctx.steps):
            side, r = projection_side(g.shape, self.proj_type), effective_rank(g.shape, self.rank)
            seed = projection_seed(self.seed, position[id(p)], (t - 1) // self.update_proj_gap)
            proj = random_projector(projector_shape(g.shape, self.rank, self.proj_type), r, seed, g.device, g.dtype)
            low = project(g, proj, side)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(low, 1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(low, low, value=1.0 - self.beta2)
            denom = (v.sqrt() / math.sqrt(1.0 - self.beta2**t)).add_(self.eps)
            direction = m.div(denom).div_(1.0 - self.beta1**t)
            dim = (0 if side == "left" else 1) if self.channelwise else None
            num = torch.linalg.vector_norm(direction, dim=dim, keepdim=True)
            den = torch.linalg.vector_norm(low, dim=dim, keepdim=True)
            s = torch.where(den > 0, num / den, torch.zeros_like(num))
            out.append((g.reshape(g.shape[0], -1) * s).reshape(g.shape))
        return out
