"""P operator: PSGD's Kronecker-factored preconditioner (Xi-Lin Li, "Preconditioned Stochastic
Gradient Descent", IEEE TNNLS 2018; "Black Box Lie Group Preconditioners for SGD", 2022), as the
``kron`` optimizer of psgd_jax / kron_torch / timm ``Kron`` runs it.

For a tensor G (the bias-corrected momentum, ``m / (1 - β1^t)``) with dims d = 1..n, each dim has
a factor Q_d: upper-triangular (n_d x n_d, initialised to s^(1/n)·I) or, where n_d == 1,
n_d > ``max_size_triangular`` or the tensor has fewer than ``min_ndim_triangular`` dims, a
diagonal (a vector). Writing X ×_d M for M applied along dim d:

    update Q (on steps drawn with probability ``update_probability``):
        V ~ N(0, I);  A = G ×_1 Q_1 ... ×_n Q_n;   B = V ×_1 Q_1^{-T} ... ×_n Q_n^{-T}
        T1_d = A_(d) A_(d)ᵀ,  T2_d = B_(d) B_(d)ᵀ     (mode-d Gram matrices; row sums of squares for diagonals)
        Q_d <- Q_d - η · triu(T1_d - T2_d) / (‖T1_d + T2_d‖₂ + tiny) · Q_d     (triangular; ‖·‖₂: a lower bound)
        Q_d <- Q_d - η · (T1_d - T2_d) ⊙ Q_d / (max|T1_d + T2_d| + tiny)       (diagonal)
    precondition:  u = G ×_1 Q_1ᵀQ_1 ... ×_n Q_nᵀQ_n;   u <- u · min(1, 1.1 / (rms(u) + 1e-6))

η is ``precond_lr``; tiny is bfloat16's smallest normal (as kron). All Q_d are updated from the
same A and B (computed with the old factors). ``momentum_into_precond_update=False`` fits Q to the
raw gradient instead of the momentum.

Simplifications and choices (documented differences from kron/timm):

- **Seeded, per-step update draws.** Whether Q is updated at step t is ``U < p`` with U from
  ``torch.Generator().manual_seed(probe_seed(seed, t, -1))``; the probe V of the parameter at
  position j of its group is ``probe_like(G, seed, t, j, 0, "gaussian")`` (see
  distopt/estimators/hutchinson.py). timm replaces the draw by a deterministic counter; psgd_jax
  draws from its own key. ``update_probability=None`` is kron's schedule
  p(t) = clip(exp(-0.001·(t - 1 - 500)), 0.03, 1).
- **Balancing** the factors' norms to their geometric mean runs before every Q update of a
  tensor with ndim > 1 (kron: at random, about every 100 updates). It leaves the Kronecker
  product, hence the math, unchanged and only guards against over/underflow.
- Scalars are treated as 1-element vectors; Q and the preconditioning run in the parameter's
  dtype promoted to at least float32 (float64 stays float64: kron's triangular solve always
  uses float32). No ``memory_save_mode``.
- A Q update that produces a non-finite factor is dropped (all factors keep their values) and
  counted in ``precond_skipped`` (int64), so parameters never turn NaN silently.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.estimators.hutchinson import probe_like, probe_seed

TINY = torch.finfo(torch.bfloat16).tiny


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def update_probability(t: int, probability: float | None) -> float:
    """The given probability, or kron's default schedule at 1-based step t."""
    if probability is not None:
        return probability
    return min(1.0, max(0.03, math.exp(-0.001 * (t - 1 - 500))))


def _unfold(x: Tensor, d: int) -> Tensor:
    return torch.movedim(x, d, 0).reshape(x.shape[d], -1)


def _fold(m: Tensor, d: int, shape: torch.Size) -> Tensor:
    moved = (shape[d], *shape[:d], *shape[d + 1:])
    return torch.movedim(m.reshape(moved), 0, d)


def _along(x: Tensor, q: Tensor, d: int, transpose: bool = False) -> Tensor:
    """x ×_d Q (or Qᵀ); a vector q is a diagonal."""
    if q.ndim == 1:
        return x * q.view([-1 if k == d else 1 for k in range(x.ndim)])
    return _fold((q.T if transpose else q) @ _unfold(x, d), d, x.shape)


def _solve_along(x: Tensor, q: Tensor, d: int) -> Tensor:
    """x ×_d Q^{-T} for an upper-triangular Q (a vector q is a diagonal)."""
    if q.ndim == 1:
        return x / q.view([-1 if k == d else 1 for k in range(x.ndim)])
    return _fold(torch.linalg.solve_triangular(q.T, _unfold(x, d), upper=False), d, x.shape)


def norm_lower_bound(a: Tensor) -> Tensor:
    """Li's cheap lower bound of the spectral norm of a symmetric matrix: one power step from
    its largest row (the kron code's ``_norm_lower_bound``, without host syncs)."""
    max_abs = a.abs().max()
    a = a / torch.where(max_abs > 0, max_abs, torch.ones_like(max_abs))
    aa = a * a
    value0, i = aa.sum(dim=0).max(dim=0)
    value1, j = aa.sum(dim=1).max(dim=0)
    x0 = a.index_select(1, i.reshape(1)).flatten() @ a
    bound0 = torch.linalg.vector_norm((x0 / torch.linalg.vector_norm(x0).clamp_min(TINY)) @ a.T)
    x1 = a @ a.index_select(0, j.reshape(1)).flatten()
    bound1 = torch.linalg.vector_norm(a.T @ (x1 / torch.linalg.vector_norm(x1).clamp_min(TINY)))
    return max_abs * torch.where(value0 > value1, bound0, bound1)


class KronPreconditioner(Operator):
    """PSGD Kron: fit the factors Q_d (state ``Q0``, ``Q1``, ...) and return ``Pu`` RMS-capped."""

    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, beta1: float, probability: float | None = None, max_size_triangular: int = 8192,
                 min_ndim_triangular: int = 2, precond_lr: float = 0.1, init_scale: float = 1.0,
                 momentum_into_precond_update: bool = True, seed: int = 0) -> None:
        self.beta1, self.probability, self.precond_lr, self.init_scale = beta1, probability, precond_lr, init_scale
        self.max_size, self.min_ndim, self.seed = max_size_triangular, min_ndim_triangular, seed
        self.momentum_into_precond_update = momentum_into_precond_update

    def init(self, param: Tensor) -> dict[str, Any]:
        shape = param.shape or torch.Size([1])
        scale = self.init_scale ** (1.0 / len(shape))
        kw = dict(dtype=compute_dtype(param.dtype), device=param.device)
        state: dict[str, Any] = {}
        for d, n in enumerate(shape):
            diagonal = n == 1 or n > self.max_size or len(shape) < self.min_ndim
            state[f"Q{d}"] = scale * (torch.ones(n, **kw) if diagonal else torch.eye(n, **kw))
        state["precond_skipped"] = torch.zeros((), dtype=torch.int64, device=param.device)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        position = {id(p): j for j, p in enumerate(ctx.group["params"])}
        out = []
        for u, p, state, t in zip(updates, ctx.params, ctx.states, ctx.steps):
            shape = p.shape or torch.Size([1])
            g = u.to(compute_dtype(p.dtype)).reshape(shape) / (1.0 - self.beta1**t)
            qs = [state[f"Q{d}"] for d in range(len(shape))]
            if self._due(t):
                fit = g
                if not self.momentum_into_precond_update:
                    fit = (-p.grad if ctx.group.get("maximize") else p.grad).to(g.dtype).reshape(shape)
                self._update_factors(qs, fit, probe_like(g, self.seed, t, position[id(p)], 0, "gaussian"), state)
            pre = g
            for d, q in enumerate(qs):
                pre = _along(_along(pre, q, d), q, d, transpose=True) if q.ndim == 2 else _along(pre, q * q, d)
            pre = pre * torch.clamp(1.1 / (pre.square().mean().sqrt() + 1e-6), max=1.0)
            out.append(pre.reshape(p.shape).to(p.dtype))
        return out

    def _due(self, t: int) -> bool:
        gen = torch.Generator().manual_seed(probe_seed(self.seed, t, -1))
        return torch.rand((), generator=gen, dtype=torch.float64).item() < update_probability(t, self.probability)

    def _update_factors(self, qs: list[Tensor], g: Tensor, v: Tensor, state: dict[str, Any]) -> None:
        if len(qs) > 1:  # balance the norms (the product, hence the math, is unchanged)
            norms = torch.stack([q.abs().max() for q in qs])
            scale = norms.prod() ** (1.0 / len(qs)) / norms
            for q, s in zip(qs, scale):
                q.mul_(s)
        a, b = g, v
        for d, q in enumerate(qs):
            a, b = _along(a, q, d), _solve_along(b, q, d)
        new = []
        for d, q in enumerate(qs):
            if q.ndim == 1:
                t1, t2 = _unfold(a, d).square().sum(1), _unfold(b, d).square().sum(1)
                new.append(q - self.precond_lr * (t1 - t2) * q / ((t1 + t2).abs().max() + TINY))
            else:
                ad, bd = _unfold(a, d), _unfold(b, d)
                t1, t2 = ad @ ad.T, bd @ bd.T
                new.append(q - self.precond_lr * torch.triu(t1 - t2) / (norm_lower_bound(t1 + t2) + TINY) @ q)
        finite = torch.stack([torch.isfinite(n).all() for n in new]).all()
        for q, n in zip(qs, new):
            q.copy_(torch.where(finite, n, q))
        state["precond_skipped"].add_((~finite).to(torch.int64))
