"""Φ operator: Adafactor's factored second moment (row and column EMAs of g²).

For a tensor with ``ndim >= 2`` (factored over its last two dimensions, shape ``(..., n, m)``):

    R_t = R_{t-1} + w_t · (mean_cols(g²) - R_{t-1})        (shape ``(..., n, 1)``, key ``row_var``)
    C_t = C_{t-1} + w_t · (mean_rows(g²) - C_{t-1})        (shape ``(..., 1, m)``, key ``col_var``)

for ``ndim <= 1`` the full EMA ``V_t = V_{t-1} + w_t (g² - V_{t-1})`` (key ``variance``), with
the relative decay ``w_t = t^{τ}`` (``τ = beta2_decay``, default -0.8), i.e. β̂2_t = 1 - t^{τ}.
Returns ``g`` unchanged. Memory is O(n + m) instead of O(n m) per matrix.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
Algorithm 4 and Section 7 (β̂2_t = 1 - t^{-0.8}). As in torch.optim.Adafactor the factors are
row/column *means* (the paper's sums differ by constants that cancel in
:class:`~distopt.preconditioners.factored.FactoredRootPreconditioner`). Locality: TENSOR
(each factor is a reduction over whole rows / columns).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class FactoredSecondMoment(Operator):
    """Row/column (or full, for vectors) EMAs of ``g²`` with decay ``1 - t^{beta2_decay}``."""

    stage = Stage.PHI
    locality = Locality.TENSOR

    def __init__(self, beta2_decay: float = -0.8) -> None:
        self.beta2_decay = beta2_decay

    def init(self, param: Tensor) -> dict[str, Tensor]:
        if param.dim() > 1:
            return {"row_var": param.new_zeros((*param.shape[:-1], 1)),
                    "col_var": param.new_zeros((*param.shape[:-2], 1, param.shape[-1]))}
        return {"variance": torch.zeros_like(param, memory_format=torch.preserve_format)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        weights = [float(t) ** self.beta2_decay for t in ctx.steps]
        mat = [i for i, u in enumerate(updates) if u.dim() > 1]
        vec = [i for i, u in enumerate(updates) if u.dim() <= 1]
        if mat:
            w = [weights[i] for i in mat]
            for key, dim in (("row_var", -1), ("col_var", -2)):
                means = [torch.norm(updates[i], dim=dim, keepdim=True).square_().div_(updates[i].size(dim))
                         for i in mat]
                ctx.ops.lerp_([ctx.states[i][key] for i in mat], means, w)
        if vec:
            g = [updates[i] for i in vec]
            ctx.ops.lerp_([ctx.states[i]["variance"] for i in vec], ctx.ops.mul(g, g), [weights[i] for i in vec])
        return updates
