"""P operator: AdamP / SGDP projection of the update onto the tangent space of
scale-invariant weights, with the reduced weight decay that goes with it.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", ICLR 2021 (Algorithms 1-2 and the authors' code, clovaai/AdamP). For a tensor with
``ndim > 1`` and gradient ``g`` (read from ``p.grad``), views are tried in order, first one
row per output channel, then the whole tensor; with ``d`` the row length of the view:

    if max_rows |cos(g_row, p_row)| < δ / sqrt(d):              (weights look scale invariant)
        p̂ = p_row / (||p_row|| + ε);   u <- u - p̂ <p̂, u>_row;   ratio = wd_ratio
    else: next view (no projection, ratio = 1)
    p <- p (1 - lr · wd · ratio · wd_scale)                        (decoupled, before the step)

``wd_scale`` is ``1 / (1 - momentum)`` for SGDP. Both tests and the branch are computed
with ``torch.where``, so there is no host synchronisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


class ScaleInvariantProjection(Operator):
    """Remove the radial component of the update where ``p`` looks scale invariant (a new list)."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(
        self, delta: float, wd_ratio: float, eps: float, weight_decay: float = 0.0,
        lr: float | None = None, wd_scale: float = 1.0,
    ) -> None:
        self.delta, self.wd_ratio, self.eps = delta, wd_ratio, eps
        self.weight_decay, self.lr, self.wd_scale = weight_decay, lr, wd_scale

    def _project(self, p: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
        one = torch.ones((), dtype=p.dtype, device=p.device)
        if p.dim() <= 1:
            return u.clone(), one
        rows, shape = p.reshape(p.shape[0], -1), [-1] + [1] * (p.dim() - 1)
        cos_rows = F.cosine_similarity(g.reshape(p.shape[0], -1), rows, dim=1, eps=self.eps).abs().max()
        cos_all = F.cosine_similarity(g.reshape(1, -1), p.reshape(1, -1), dim=1, eps=self.eps).abs().max()
        channel = cos_rows < self.delta / math.sqrt(rows.shape[1])
        layer = cos_all < self.delta / math.sqrt(p.numel())
        norm = torch.where(channel, rows.norm(dim=1).view(shape), p.norm().reshape([1] * p.dim())) + self.eps
        p_n = p / norm
        radial = torch.where(channel, (p_n * u).reshape(p.shape[0], -1).sum(dim=1).view(shape), (p_n * u).sum())
        projected = channel | layer
        out = u - torch.where(projected, p_n * radial, torch.zeros_like(u))
        return out, torch.where(projected, one * self.wd_ratio, one)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        outs, ratios = [], []
        for p, u in zip(ctx.params, updates):
            g = p.grad if p.grad is not None else u
            out, ratio = self._project(p, g, u)
            outs.append(out)
            ratios.append(ratio)
        if self.weight_decay:
            lr = ctx.group["lr"] if self.lr is None else self.lr
            decay = lr * self.weight_decay * self.wd_scale
            ctx.ops.mul_(ctx.params, [1.0 - decay * r for r in ratios])
        return outs
