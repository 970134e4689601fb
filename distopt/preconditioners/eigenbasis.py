"""SOAP's operators: Adam run in the eigenbasis of Shampoo's factors.

Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321 (2024),
Algorithm 3, as in the authors' reference ``soap.py`` (github.com/nikhilvyas/SOAP). A tensor is
seen in its *view* (:func:`soap_view`); each dimension i of the view with size <= ``max_dim`` has a
factor GG_i (the mode-i Gram matrix of the gradient) and an orthogonal basis Q_i; other dimensions
are left in the standard basis. With ``rot(X) = X ×_i Q_iᵀ`` (rotate every dimension into its
basis) and ``rot⁻¹(X) = X ×_i Q_i``:

``SoapFactors`` (Φ):          GG_i <- lerp(GG_i, G_(i) G_(i)ᵀ, 1 - shampoo_beta)
``EigenbasisAdam`` (P):       G' = rot(G);  m <- β1 m + (1-β1) G';  v <- β2 v + (1-β2) G'²
                              u = rot⁻¹(m / (sqrt(v) + ε)) · sqrt(1-β2^τ) / (1-β1^τ)
                              (τ = t - 1: the first step only builds the basis; ``normalize_grads``:
                              u <- u / (1e-30 + rms(u)) before the bias-correction factor)
``EigenbasisRefresh`` (P):    t = 1: Q_i = eigenvectors of GG_i (``eigh``, descending eigenvalues);
                              τ > 0 and τ % frequency == 0: one power iteration with QR,
                              Q_i <- qr(GG_i Q_i[:, σ]).Q with σ sorting diag(Q_iᵀ GG_i Q_i) descending,
                              v permuted by σ along i, and m (kept in the rotated basis) carried
                              into the new basis: m <- rot_new(rot⁻¹_old(m)).

m and v are stored in the rotated basis (the reference's layout). The updates of GG use the
gradient of the current step, and the basis is refreshed *after* the parameter update, so the
current gradient never enters its own projection (the reference's order). Same-view tensors are
stacked and rotated with ``bmm``; all statistics are kept in float32 or wider.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from distopt.core.chain import Chain
from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.preconditioners.blocks import factor_dtype


def merged_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """The reference's ``merge_dims``: merge consecutive dimensions while the product stays <= max_dim."""
    out, current = [], 1
    for d in shape:
        if current * d > max_dim:
            if current > 1:
                out.append(current)
                current = d
            else:
                out.append(d)
                current = 1
        else:
            current *= d
    if current > 1 or not out:
        out.append(current)
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def soap_view(shape: tuple[int, ...], max_dim: int, merge: bool,
              precondition_1d: bool) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """``(view, preconditioned)``: the shape SOAP works in and which of its dimensions have a basis.
    1-D tensors have one only with ``precondition_1d``; a scalar is the vector (1,) without one."""
    shape = tuple(int(s) for s in shape)
    if len(shape) <= 1:
        view = shape or (1,)
        return view, ((precondition_1d and len(shape) == 1 and view[0] <= max_dim),)
    view = merged_shape(shape, max_dim) if merge else shape
    return view, tuple(d <= max_dim for d in view)


def rotate(x: Tensor, qs: list[Tensor | None], back: bool = False) -> Tensor:
    """``x ×_i Q_iᵀ`` (into the basis) or, with ``back``, ``x ×_i Q_i`` for a stack ``x`` of shape
    (batch, *view) and per-dimension stacks ``qs[i]`` of shape (batch, d_i, d_i) (None: identity)."""
    if x.dim() == 3:  # matrices: two bmm, no copies
        if qs[0] is not None:
            x = torch.bmm(qs[0], x) if back else torch.bmm(qs[0].mT, x)
        if qs[1] is not None:
            x = torch.bmm(x, qs[1].mT) if back else torch.bmm(x, qs[1])
        return x
    for i, q in enumerate(qs):
        if q is None:
            continue
        moved = x.movedim(i + 1, -1)
        shape = moved.shape
        y = torch.bmm(moved.reshape(shape[0], -1, shape[-1]), q.mT if back else q)
        x = y.reshape(shape).movedim(-1, i + 1)
    return x


class _SoapOperator(Operator):
    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, max_dim: int, merge: bool, precondition_1d: bool) -> None:
        self.max_dim, self.merge, self.precondition_1d = max_dim, merge, precondition_1d

    def view(self, param: Tensor) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        return soap_view(tuple(param.shape), self.max_dim, self.merge, self.precondition_1d)

    def buckets(self, ctx: StepContext, which: list[int]) -> list[tuple[tuple[int, ...], tuple[bool, ...], list[int]]]:
        """``(view, preconditioned, indices)``: the indices of ``which`` with the same view, dtype
        and device, each group one stack."""
        out: dict[tuple, list[int]] = {}
        for i in which:
            p = ctx.params[i]
            out.setdefault((*self.view(p), p.dtype, p.device), []).append(i)
        return [(key[0], key[1], idx) for key, idx in out.items()]

    @staticmethod
    def bases(ctx: StepContext, idx: list[int], pre: tuple[bool, ...]) -> list[Tensor | None]:
        return [torch.stack([ctx.states[i][f"Q_{d}"] for i in idx]) if on else None for d, on in enumerate(pre)]


class SoapFactors(_SoapOperator):
    """GG_i <- lerp(GG_i, G_(i) G_(i)ᵀ, 1 - β) for every preconditioned dimension i; returns the update."""

    stage = Stage.PHI

    def __init__(self, shampoo_beta: float, max_dim: int, merge: bool, precondition_1d: bool) -> None:
        super().__init__(max_dim, merge, precondition_1d)
        self.shampoo_beta = shampoo_beta

    def init(self, param: Tensor) -> dict[str, Tensor]:
        view, pre = self.view(param)
        dt, dev = factor_dtype(param.dtype), param.device
        state = {}
        for d, (n, on) in enumerate(zip(view, pre)):
            if on:
                state[f"GG_{d}"] = torch.zeros(n, n, dtype=dt, device=dev)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        for view, pre, idx in self.buckets(ctx, list(range(len(updates)))):
            if not any(pre):
                continue
            dt = ctx.states[idx[0]][f"GG_{pre.index(True)}"].dtype
            g = torch.stack([updates[i].to(dt).reshape(view) for i in idx])
            for d, on in enumerate(pre):
                if on:
                    mode = g.movedim(d + 1, 1).reshape(len(idx), view[d], -1)
                    ctx.ops.lerp_([ctx.states[i][f"GG_{d}"] for i in idx], list(torch.bmm(mode, mode.mT).unbind(0)),
                                  1.0 - self.shampoo_beta)
        return updates


class AfterFirstStep(Operator):
    """Run ``inner`` only on the parameters past their first step (SOAP's first step only builds
    the basis: no parameter update, no weight decay); the others pass through unchanged."""

    stage = Stage.P

    def __init__(self, inner: Chain) -> None:
        self.inner = inner
        self.locality = inner.locality  # type: ignore[misc]

    def init(self, param: Tensor) -> dict[str, Any]:
        return self.inner.init(param)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        idx = [i for i, t in enumerate(ctx.steps) if t > 1]
        if not idx:
            return updates
        sub = StepContext(ctx.group, [ctx.params[i] for i in idx], [ctx.states[i] for i in idx],
                          [ctx.steps[i] for i in idx], ctx.ops)
        out = list(updates)
        for i, u in zip(idx, self.inner.update([updates[i] for i in idx], sub)):
            out[i] = u
        return out


class EigenbasisAdam(_SoapOperator):
    """Adam on the rotated update; returns rot⁻¹(m / (sqrt(v) + ε)) times the bias-correction factor."""

    def __init__(self, betas: tuple[float, float], eps: float, correct_bias: bool, normalize: bool,
                 max_dim: int, merge: bool, precondition_1d: bool) -> None:
        super().__init__(max_dim, merge, precondition_1d)
        self.betas, self.eps, self.correct_bias, self.normalize = tuple(betas), eps, correct_bias, normalize

    def init(self, param: Tensor) -> dict[str, Tensor]:
        dt = factor_dtype(param.dtype)
        return {k: torch.zeros(param.shape, dtype=dt, device=param.device) for k in ("exp_avg", "exp_avg_sq")}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        b1, b2 = self.betas
        out: list[Tensor] = list(updates)
        for view, pre, idx in self.buckets(ctx, list(range(len(updates)))):
            states = [ctx.states[i] for i in idx]
            dt, n = states[0]["exp_avg"].dtype, len(idx)
            qs = self.bases(ctx, idx, pre)
            g = rotate(torch.stack([updates[i].to(dt).reshape(view) for i in idx]), qs)
            gs = [x.reshape(ctx.params[i].shape) for x, i in zip(g.unbind(0), idx)]
            m, v = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
            ctx.ops.mul_(m, b1)
            ctx.ops.add_(m, gs, alpha=1.0 - b1)
            ctx.ops.mul_(v, b2)
            ctx.ops.addcmul_(v, gs, gs, value=1.0 - b2)
            denom = ctx.ops.sqrt(v)
            ctx.ops.add_(denom, self.eps)
            ratio = ctx.ops.div(m, denom)
            u = rotate(torch.stack([r.reshape(view) for r in ratio]), qs, back=True).reshape(n, -1)
            if self.normalize:
                u = u / (1e-30 + u.square().mean(dim=1, keepdim=True).sqrt())
            for k, i in enumerate(idx):
                tau = ctx.steps[i] - 1
                scale = math.sqrt(1.0 - b2**tau) / (1.0 - b1**tau) if self.correct_bias else 1.0
                out[i] = (u[k] * scale).reshape(ctx.params[i].shape).to(ctx.params[i].dtype)
        return out


def _eigenvectors(a: Tensor) -> Tensor:
    """Eigenvectors of a stack of symmetric matrices, columns by descending eigenvalue (the
    reference adds 1e-30 I and retries in float64 if the solver fails)."""
    a = a + 1e-30 * torch.eye(a.size(-1), dtype=a.dtype, device=a.device)
    try:
        q = torch.linalg.eigh(a)[1]
    except torch.linalg.LinAlgError:
        q = torch.linalg.eigh(a.to(torch.float64))[1].to(a.dtype)
    return q.flip(-1)


class EigenbasisRefresh(_SoapOperator):
    """Build the bases at step 1 (eigh) and refresh them every ``frequency`` Adam steps (QR power
    iteration), carrying ``exp_avg`` and ``exp_avg_sq`` into the new basis; returns the update."""

    def __init__(self, frequency: int, max_dim: int, merge: bool, precondition_1d: bool) -> None:
        super().__init__(max_dim, merge, precondition_1d)
        self.frequency = frequency

    def init(self, param: Tensor) -> dict[str, Tensor]:
        view, pre = self.view(param)
        dt = factor_dtype(param.dtype)
        return {f"Q_{d}": torch.eye(n, dtype=dt, device=param.device) for d, (n, on) in enumerate(zip(view, pre)) if on}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        first = [i for i, t in enumerate(ctx.steps) if t == 1]
        due = [i for i, t in enumerate(ctx.steps) if t > 1 and (t - 1) % self.frequency == 0]
        for view, pre, idx in self.buckets(ctx, first):
            for d in (d for d, on in enumerate(pre) if on):
                q = _eigenvectors(torch.stack([ctx.states[i][f"GG_{d}"] for i in idx]))
                torch._foreach_copy_([ctx.states[i][f"Q_{d}"] for i in idx], list(q.unbind(0)))
        for view, pre, idx in self.buckets(ctx, due):
            if any(pre):
                self._refresh(ctx, idx, view, pre)
        return updates

    def _refresh(self, ctx: StepContext, idx: list[int], view: tuple[int, ...], pre: tuple[bool, ...]) -> None:
        states, n = [ctx.states[i] for i in idx], len(idx)
        old = self.bases(ctx, idx, pre)
        m = rotate(torch.stack([s["exp_avg"].reshape(view) for s in states]), old, back=True)
        v = torch.stack([s["exp_avg_sq"].reshape(view) for s in states])
        new: list[Tensor | None] = []
        for d, q in enumerate(old):
            if q is None:
                new.append(None)
                continue
            gg = torch.stack([s[f"GG_{d}"] for s in states])
            power = gg @ q
            order = torch.argsort((q * power).sum(dim=-2), dim=-1, descending=True)  # diag(Qᵀ GG Q)
            shape = [n] + [1] * len(view)
            shape[d + 1] = view[d]
            v = torch.gather(v, d + 1, order.view(shape).expand_as(v))
            power = torch.gather(power, 2, order[:, None, :].expand_as(power))
            new.append(torch.linalg.householder_product(*torch.geqrf(power)))  # = linalg.qr(power).Q
        m = rotate(m, new, back=False)
        for k, s in enumerate(states):
            s["exp_avg"].copy_(m[k].reshape(s["exp_avg"].shape))
            s["exp_avg_sq"].copy_(v[k].reshape(s["exp_avg_sq"].shape))
            for d, q in enumerate(new):
                if q is not None:
                    s[f"Q_{d}"].copy_(q[k])
