"""Batched linear-algebra kernels of the Kronecker preconditioners (Shampoo, SOAP).

``inverse_root(A, root, eps, method)``: X_b ≈ (A_b + ε I)^{-1/root} for a (batch, d, d) stack of
symmetric positive semi-definite matrices, with a per-matrix ``ok`` flag (False where the result is
not finite). Two methods, as in Distributed Shampoo (Shi et al., "A Distributed Data-Parallel
PyTorch Implementation of the Distributed Shampoo Optimizer", arXiv:2309.06497, 2023):

- ``"eigh"``: A = Q diag(λ) Qᵀ (``torch.linalg.eigh``), X = Q diag((max(λ, 0) + ε)^{-1/root}) Qᵀ.
  Eigenvalues below zero (round-off of a PSD matrix) are clamped to 0 before ε is added.
- ``"coupled_newton"``: Higham's coupled Newton iteration for the inverse p-th root ("Functions of
  Matrices", 2008, §7.3; Distributed Shampoo's ``_matrix_inverse_root_newton``):
  z = (p + 1) / (2 ||A + εI||_F), X_0 = z^{1/p} I, M_0 = z (A + εI), then
  T = ((p + 1) I - M) / p;  X <- X T;  M <- T^p M   until max|M - I| <= tol for every matrix of
  the batch or ``max_iterations``; a matrix still farther than sqrt(tol) from convergence then
  counts as failed (NaN). It needs A + εI positive definite: round-off negative eigenvalues of a
  low-precision factor make it diverge (a failure, the previous root is kept); ``eigh`` clamps them.

If the batched ``eigh`` raises ``torch.linalg.LinAlgError`` every matrix is retried alone; the ones
that fail again come back with ``ok = False`` (their X is left as NaN), so a caller can keep its
previous root for exactly those matrices.
"""
from __future__ import annotations

import torch
from torch import Tensor

NEWTON_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}


def _eigh_or_nan(a: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.eigh`` of a stack; on LinAlgError retry each matrix alone, NaN where it fails."""
    try:
        return torch.linalg.eigh(a)
    except torch.linalg.LinAlgError:
        lams, qs = [], []
        for m in a:
            try:
                lam, q = torch.linalg.eigh(m)
            except torch.linalg.LinAlgError:
                lam, q = torch.full_like(m[0], float("nan")), torch.full_like(m, float("nan"))
            lams.append(lam)
            qs.append(q)
        return torch.stack(lams), torch.stack(qs)


def eigh_inverse_root(a: Tensor, root: int, eps: float) -> Tensor:
    """(A + εI)^{-1/root} for a (batch, d, d) stack by eigendecomposition (NaN where eigh fails)."""
    lam, q = _eigh_or_nan(a)
    scale = (lam.clamp_min(0.0) + eps).pow(-1.0 / root)
    return (q * scale.unsqueeze(-2)) @ q.mT


def coupled_newton_inverse_root(a: Tensor, root: int, eps: float, max_iterations: int = 100,
                                tolerance: float | None = None) -> Tensor:
    """(A + εI)^{-1/root} for a (batch, d, d) stack by the coupled Newton iteration."""
    tol = NEWTON_TOLERANCE.get(a.dtype, 1e-3) if tolerance is None else tolerance
    eye = torch.eye(a.size(-1), dtype=a.dtype, device=a.device).expand_as(a)
    ridge = a + eps * eye
    z = (root + 1) / (2 * torch.linalg.matrix_norm(ridge)).unsqueeze(-1).unsqueeze(-1)
    x = z.pow(1.0 / root) * eye
    m = z * ridge
    for _ in range(max_iterations):
        if not bool(((m - eye).abs().amax(dim=(-2, -1)) > tol).any().item()):  # NaN counts as done
            break
        t = ((root + 1) * eye - m) / root
        x = x @ t
        m = torch.linalg.matrix_power(t, root) @ m
    # not within sqrt(tol) of convergence (e.g. A + εI not positive definite after round-off): NaN
    converged = (m - eye).abs().amax(dim=(-2, -1)) <= tol**0.5
    return torch.where(converged[..., None, None], x, torch.full_like(x, float("nan")))


def inverse_root(a: Tensor, root: int, eps: float, method: str = "eigh") -> tuple[Tensor, Tensor]:
    """``(X, ok)``: X_b ≈ (A_b + εI)^{-1/root} and ``ok[b]`` = X_b is finite (a bool vector)."""
    if method == "eigh":
        x = eigh_inverse_root(a, root, eps)
    elif method == "coupled_newton":
        x = coupled_newton_inverse_root(a, root, eps)
    else:
        raise ValueError(f"inverse_root: method must be 'eigh' or 'coupled_newton', got {method!r}")
    return x, torch.isfinite(x).all(dim=-1).all(dim=-1)
