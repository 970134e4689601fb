"""P operators of Muon: Newton–Schulz orthogonalization and the shape-scaled learning-rate step.

``NewtonSchulzOrthogonalize``: with X_0 = G / max(||G||_F, ε) (G transposed when it has more
rows than columns) iterate k times the quintic

    A = X Xᵀ;   X <- a X + (b A + c A²) X        ((a, b, c) = (3.4445, -4.7750, 2.0315))

which pushes every singular value of G towards ~1, i.e. u <- U S' Vᵀ ≈ U Vᵀ for G = U S Vᵀ
(Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024; the same
steps, order of operations and ε as ``torch.optim.Muon``). Tensors with ndim > 2 (conv
weights) are viewed as (shape[0], -1). Same-shape matrices run as one batched call.

``ApplyShapeScaledLR``: p <- p - lr·s(m, n)·u with torch's ``adjust_lr_fn`` rule on the
(m, n) matrix view: "original" (None) s = sqrt(max(1, m/n)); "match_rms_adamw" s = 0.2·sqrt(max(m, n))
(Liu et al., "Muon is Scalable for LLM Training", 2025).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def matrix_shape(shape: torch.Size) -> tuple[int, int]:
    """The (rows, cols) view Muon orthogonalizes: (shape[0], prod(shape[1:]))."""
    return int(shape[0]), int(math.prod(shape[1:]))


def newton_schulz(
    g: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = 5,
    eps: float = NS_EPS, dtype: torch.dtype | None = None,
) -> Tensor:
    """Quintic Newton–Schulz on a (batch, m, n) stack; runs in ``dtype`` (None: g's dtype)
    and returns that dtype. Never modifies ``g``."""
    a, b, c = coefficients
    x = g.to(dtype) if dtype is not None else g
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class NewtonSchulzOrthogonalize(Operator):
    """Replace each matrix update by its Newton–Schulz orthogonalization (new tensors, in the
    update's dtype); same-shape matrices are stacked and orthogonalized in one batched call."""

    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, steps: int = 5,
                 eps: float = NS_EPS, dtype: torch.dtype | None = None) -> None:
        self.coefficients, self.steps, self.eps, self.dtype = tuple(coefficients), steps, eps, dtype

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault(matrix_shape(u.shape), []).append(i)
        out: list[Tensor] = list(updates)
        for shape, idx in by_shape.items():
            batch = torch.stack([updates[i].reshape(shape) for i in idx])
            ortho = newton_schulz(batch, self.coefficients, self.steps, self.eps, self.dtype)
            for k, i in enumerate(idx):
                out[i] = ortho[k].reshape(updates[i].shape).to(updates[i].dtype)
        return out


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's ``_adjust_lr`` on the (m, n) matrix view of ``shape``."""
    m, n = matrix_shape(shape)
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, m / n))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(m, n))  # ratio first, then lr * ratio: torch's rounding
    else:
        ratio = 1.0
    return lr * ratio


class ApplyShapeScaledLR(Operator):
    """``p <- p - adjusted_lr(lr, shape) * u``; one ``add_`` per distinct adjusted rate."""

    stage = Stage.P

    def __init__(self, lr: float | None = None, adjust_lr_fn: str | None = None) -> None:
        self.lr, self.adjust_lr_fn = lr, adjust_lr_fn

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        lr = ctx.group["lr"] if self.lr is None else self.lr
        by_rate: dict[float, list[int]] = {}
        for i, p in enumerate(ctx.params):
            by_rate.setdefault(adjusted_lr(lr, self.adjust_lr_fn, p.shape), []).append(i)
        for rate, idx in by_rate.items():
            ctx.ops.add_([ctx.params[i] for i in idx], [updates[i] for i in idx], alpha=-rate)
        return updates
