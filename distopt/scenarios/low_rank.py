"""Low-rank gradient projection for matrices (GaLore: Zhao et al., "GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection", ICML 2024, Algorithm 2).

A parameter with ndim >= 2 is viewed as the matrix G of shape (m, n) = (shape[0], prod(shape[1:])).
With r = min(rank, m, n), the projection acts on one side, chosen by ``proj_type`` as the
authors' code does: ``"std"``: the smaller side (``"left"`` if m < n else ``"right"``);
``"reverse_std"``: the larger side; or ``"left"`` / ``"right"`` explicitly.

    left:  P (m, r),  R = Pᵀ G  (r, n),  back(N) = P N   (m, n)
    right: P (r, n),  R = G Pᵀ  (m, r),  back(N) = N P   (m, n)

``GaLoreProjection`` (T) refreshes P every ``update_proj_gap`` steps (at steps 1, 1 + T, ...,
i.e. the paper's ``t mod T = 0`` with t counted from 0) from the SVD of the current gradient,
G = U S Vᵀ: left P = U[:, :r], right P = Vᵀ[:r, :]; the SVD runs in float32 (float64 for
float64 params) whatever the param dtype; P is stored in the param's dtype (``projector``).
It returns R. ``LowRankFirstMoment`` / ``LowRankSecondMoment`` are Adam's moments of R's shape;
``ProjectBack`` (P) maps the low-rank direction back with the stored projector.
Locality: MATRIX (an SVD and products with whole rows / columns).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distopt.accumulators.moments import FirstMoment, SecondMoment
from distopt.core.operator import Locality, Operator, Stage, StepContext

PROJ_TYPES = ("std", "reverse_std", "left", "right")


def matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    """(m, n) = (shape[0], prod(shape[1:])): the matrix a tensor with ndim >= 2 is treated as."""
    return int(shape[0]), int(math.prod(shape[1:]))


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """``"left"`` or ``"right"`` for a tensor of ``shape`` under ``proj_type``."""
    m, n = matrix_shape(shape)
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def effective_rank(shape: torch.Size | tuple[int, ...], rank: int) -> int:
    """``min(rank, m, n)``: a projection never has more directions than the matrix's short side."""
    m, n = matrix_shape(shape)
    return min(rank, m, n)


def projector_shape(shape: torch.Size | tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    m, n = matrix_shape(shape)
    r = effective_rank(shape, rank)
    return (m, r) if projection_side(shape, proj_type) == "left" else (r, n)


def low_rank_shape(shape: torch.Size | tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of R (and of the low-rank moments)."""
    m, n = matrix_shape(shape)
    r = effective_rank(shape, rank)
    return (r, n) if projection_side(shape, proj_type) == "left" else (m, r)


def project(g: Tensor, projector: Tensor, side: str) -> Tensor:
    """R = Pᵀ G (left) or G Pᵀ (right) for the (m, n) view of ``g``."""
    g = g.reshape(g.shape[0], -1)
    return projector.mT @ g if side == "left" else g @ projector.mT


def project_back(n: Tensor, projector: Tensor, side: str) -> Tensor:
    """P N (left) or N P (right), an (m, n) matrix."""
    return projector @ n if side == "left" else n @ projector


def svd_projector(g: Tensor, rank: int, side: str) -> Tensor:
    """GaLore's projector from the SVD of the (m, n) view of ``g`` (float32, or float64 for
    float64 gradients), returned in ``g``'s dtype."""
    dtype = torch.promote_types(g.dtype, torch.float32)
    u, _, vh = torch.linalg.svd(g.reshape(g.shape[0], -1).to(dtype), full_matrices=False)
    p = u[:, :rank] if side == "left" else vh[:rank, :]
    return p.to(g.dtype)


class GaLoreProjection(Operator):
    """R = project(G, P) with P refreshed from the SVD of G every ``update_proj_gap`` steps."""

    stage = Stage.T
    locality = Locality.MATRIX

    def __init__(self, rank: int, update_proj_gap: int, proj_type: str = "std", key: str = "projector") -> None:
        self.rank, self.update_proj_gap, self.proj_type, self.key = rank, update_proj_gap, proj_type, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        shape = projector_shape(param.shape, self.rank, self.proj_type)
        return {self.key: torch.zeros(shape, dtype=param.dtype, device=param.device)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        out = []
        for g, state, t in zip(updates, ctx.states, ctx.steps):
            side = projection_side(g.shape, self.proj_type)
            if (t - 1) % self.update_proj_gap == 0:
                state[self.key].copy_(svd_projector(g, effective_rank(g.shape, self.rank), side))
            out.append(project(g, state[self.key], side))
        return out


class LowRankFirstMoment(FirstMoment):
    """:class:`FirstMoment` of the projected gradient (buffer of R's shape)."""

    def __init__(self, beta: float, rank: int, proj_type: str = "std", key: str = "exp_avg") -> None:
        super().__init__(beta, key)
        self.rank, self.proj_type = rank, proj_type

    def init(self, param: Tensor) -> dict[str, Tensor]:
        shape = low_rank_shape(param.shape, self.rank, self.proj_type)
        return {self.key: torch.zeros(shape, dtype=param.dtype, device=param.device)}


class LowRankSecondMoment(SecondMoment):
    """:class:`SecondMoment` of the projected gradient (buffer of R's shape)."""

    def __init__(self, beta: float, rank: int, proj_type: str = "std", key: str = "exp_avg_sq") -> None:
        super().__init__(beta, amsgrad=False, key=key)
        self.rank, self.proj_type = rank, proj_type

    def init(self, param: Tensor) -> dict[str, Tensor]:
        shape = low_rank_shape(param.shape, self.rank, self.proj_type)
        return {self.key: torch.zeros(shape, dtype=param.dtype, device=param.device)}


class ProjectBack(Operator):
    """u <- back(N) with the projector stored by :class:`GaLoreProjection` (a new tensor of the
    param's shape)."""

    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, proj_type: str = "std", key: str = "projector") -> None:
        self.proj_type, self.key = proj_type, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        return [project_back(n, s[self.key], projection_side(p.shape, self.proj_type)).reshape(p.shape)
                for n, s, p in zip(updates, ctx.states, ctx.params)]
