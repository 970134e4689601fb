"""Shampoo's Kronecker-factored preconditioner, block by block (layout: :mod:`.blocks`).

Gupta, Koren & Singer, "Shampoo: Preconditioned Stochastic Tensor Optimization", ICML 2018;
Anil et al., "Scalable Second Order Optimization for Deep Learning", arXiv:2002.09018 (2020).
For every block G_b (rows × cols) of a parameter's matrix view:

``KroneckerFactors`` (Φ):        L_b <- β2 L_b + (1 - β2) G_b G_bᵀ,  R_b <- β2 R_b + (1 - β2) G_bᵀ G_b
                                 (β2 = 1: plain sums, Shampoo/AdaGrad); diagonal vectors keep
                                 ``L_diag`` <- β2 L_diag + (1 - β2) g² instead (see the recipe).
``KroneckerInverseRoots`` (P):   every ``frequency`` steps (and at step ``start``), from t >= start:
                                 L̃_b = (L_b / c2 + εI)^{-1/(2k)}, R̃_b likewise, c2 = 1 - β2^t with
                                 bias correction (else 1), k = 2 sides for matrices, 1 for vectors.
``KroneckerPrecondition`` (P):   see its docstring (direction, grafting, start step).

Same-shape blocks of all the group's parameters are stacked and handled by one ``bmm`` / one
batched ``eigh``. State per block ``k``: ``L_k``, ``R_k`` (factors), ``L_root_k``, ``R_root_k``
(inverse roots, initialised to I), and per parameter ``root_failures`` (int64): the number of
roots that could not be computed (LinAlgError or non-finite; the previous root is kept).
Locality: MATRIX (a block is the unit).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.preconditioners.blocks import BlockLayout, block_layout, factor_dtype, from_blocks, to_blocks
from distopt.preconditioners.grafting import grafting_direction
from distopt.preconditioners.linalg import inverse_root


class _Blocked(Operator):
    """Shared layout lookup of the three Kronecker operators."""

    stage = Stage.P
    locality = Locality.MATRIX
    max_dim: int
    precondition_1d: bool

    def layout(self, param: Tensor) -> BlockLayout | None:
        return block_layout(tuple(param.shape), self.max_dim, self.precondition_1d)


class KroneckerFactors(_Blocked):
    """Accumulate the Kronecker factors of every block from the update; returns it unchanged."""

    stage = Stage.PHI

    def __init__(self, beta2: float, max_dim: int, precondition_1d: bool, diagonal_vectors: bool) -> None:
        self.beta2, self.max_dim, self.precondition_1d = beta2, max_dim, precondition_1d
        self.diagonal_vectors = diagonal_vectors

    def init(self, param: Tensor) -> dict[str, Tensor]:
        lay, dt = self.layout(param), factor_dtype(param.dtype)
        if lay is None:
            return {"L_diag": torch.zeros(param.shape, dtype=dt, device=param.device)} if self.diagonal_vectors else {}
        state = {}
        for k, (r, c) in enumerate(lay.block_shapes()):
            state[f"L_{k}"] = torch.zeros(r, r, dtype=dt, device=param.device)
            if lay.two_sided:
                state[f"R_{k}"] = torch.zeros(c, c, dtype=dt, device=param.device)
        return state

    def _accumulate(self, ops, factors: list[Tensor], grams: list[Tensor]) -> None:
        if self.beta2 == 1.0:
            ops.add_(factors, grams)
        else:
            ops.mul_(factors, self.beta2)
            ops.add_(factors, grams, alpha=1.0 - self.beta2)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        buckets: dict[tuple, list[tuple[Tensor, dict, int]]] = {}
        diag_u, diag_f = [], []
        for u, p, s in zip(updates, ctx.params, ctx.states):
            lay = self.layout(p)
            if lay is None:
                if "L_diag" in s:
                    diag_u.append(u.to(s["L_diag"].dtype))
                    diag_f.append(s["L_diag"])
                continue
            blocks = to_blocks(u.to(factor_dtype(u.dtype)), lay)
            for k, b in enumerate(blocks):
                buckets.setdefault((tuple(b.shape), lay.two_sided, b.dtype, b.device), []).append((b, s, k))
        for (_, two_sided, _, _), items in buckets.items():
            g = torch.stack([b for b, _, _ in items])
            self._accumulate(ctx.ops, [s[f"L_{k}"] for _, s, k in items], list(torch.bmm(g, g.mT).unbind(0)))
            if two_sided:
                self._accumulate(ctx.ops, [s[f"R_{k}"] for _, s, k in items], list(torch.bmm(g.mT, g).unbind(0)))
        if diag_f:
            self._accumulate(ctx.ops, diag_f, ctx.ops.mul(diag_u, diag_u))
        return updates


def _check_finite(a: Tensor, owners: list[Tensor], name: str) -> None:
    if not bool(torch.isfinite(a).all().item()):
        bad = [tuple(p.shape) for p, ok in zip(owners, torch.isfinite(a).flatten(1).all(1).tolist()) if not ok]
        raise FloatingPointError(
            f"{name}: non-finite Kronecker factor statistics for a parameter of shape {bad[0]} "
            "(the gradients overflowed); lower the learning rate or scale the loss")


class KroneckerInverseRoots(_Blocked):
    """Recompute the inverse roots of every block's factors when due (batched by size)."""

    def __init__(self, beta2: float, epsilon: float, frequency: int, start: int, method: str,
                 root_dtype: torch.dtype | None, bias_correction: bool, max_dim: int, precondition_1d: bool,
                 name: str = "shampoo") -> None:
        self.beta2, self.epsilon, self.frequency, self.start = beta2, epsilon, frequency, start
        self.method, self.root_dtype, self.bias_correction = method, root_dtype, bias_correction
        self.max_dim, self.precondition_1d, self.name = max_dim, precondition_1d, name

    def init(self, param: Tensor) -> dict[str, Tensor]:
        lay, dt = self.layout(param), factor_dtype(param.dtype)
        state = {"root_failures": torch.zeros((), dtype=torch.int64, device=param.device)}
        for k, (r, c) in enumerate(lay.block_shapes() if lay else []):
            state[f"L_root_{k}"] = torch.eye(r, dtype=dt, device=param.device)
            if lay.two_sided:
                state[f"R_root_{k}"] = torch.eye(c, dtype=dt, device=param.device)
        return state

    def due(self, step: int) -> bool:
        return step >= self.start and (step % self.frequency == 0 or step == self.start)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        buckets: dict[tuple, list[tuple[Tensor, Tensor, float, dict, Tensor]]] = {}
        for p, s, t in zip(ctx.params, ctx.states, ctx.steps):
            lay = self.layout(p)
            if lay is None or not self.due(t):
                continue
            c2 = 1.0 - self.beta2**t if self.bias_correction and self.beta2 < 1.0 else 1.0
            root = 4 if lay.two_sided else 2
            for k in range(lay.num_blocks):
                for side in ("L", "R") if lay.two_sided else ("L",):
                    f = s[f"{side}_{k}"]
                    key = (f.size(0), root, f.dtype, f.device)
                    buckets.setdefault(key, []).append((f, s[f"{side}_root_{k}"], c2, s, p))
        for (_, root, _, _), items in buckets.items():
            dt = self.root_dtype or items[0][0].dtype
            a = torch.stack([f for f, *_ in items]).to(dt)
            _check_finite(a, [p for *_, p in items], self.name)
            scale = torch.tensor([1.0 / c2 for _, _, c2, _, _ in items], dtype=dt, device=a.device)
            x, ok = inverse_root(a * scale[:, None, None], root, self.epsilon, self.method)
            olds = [r for _, r, *_ in items]
            keep = torch.where(ok[:, None, None], x, torch.stack(olds).to(dt))
            torch._foreach_copy_(olds, list(keep.to(olds[0].dtype).unbind(0)))
            failed = (~ok).to(torch.int64)
            for j, (_, _, _, s, _) in enumerate(items):
                s["root_failures"].add_(failed[j])
        return updates


class KroneckerPrecondition(_Blocked):
    """Replace the (filtered, bias-corrected) gradient m̂ by Shampoo's direction (a new list):

        t <  start:  u = D                        (D: the grafting direction; m̂ for "none")
        t >= start:  U_b = L̃_b M̂_b R̃_b            (vectors: L̃_b m̂_b), per block b
                     U_b <- U_b · ||D_b|| / ||U_b||  (grafting, unless "none")
        diagonal vectors: u = D with grafting, else u = m̂ / sqrt(L_diag / c2 + ε)
    """

    def __init__(self, start: int, grafting: str, grafting_eps: float, grafting_beta2: float, beta2: float,
                 epsilon: float, bias_correction: bool, max_dim: int, precondition_1d: bool) -> None:
        self.start, self.grafting = start, grafting
        self.grafting_eps, self.grafting_beta2 = grafting_eps, grafting_beta2
        self.beta2, self.epsilon, self.bias_correction = beta2, epsilon, bias_correction
        self.max_dim, self.precondition_1d = max_dim, precondition_1d

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        graft = grafting_direction(self.grafting, updates, ctx, self.grafting_eps, self.grafting_beta2,
                                   self.bias_correction)
        grafted = self.grafting != "none"
        out, diag = list(graft), []
        buckets: dict[tuple, list[tuple]] = {}
        pieces: dict[int, list] = {}
        for i, (m, p, s, t) in enumerate(zip(updates, ctx.params, ctx.states, ctx.steps)):
            lay = self.layout(p)
            if t < self.start or (lay is None and grafted):
                continue
            if lay is None:
                diag.append(i)
                continue
            dt = factor_dtype(p.dtype)
            ms, gs = to_blocks(m.to(dt), lay), to_blocks(graft[i].to(dt), lay) if grafted else None
            pieces[i] = [None] * lay.num_blocks
            for k, b in enumerate(ms):
                key = (tuple(b.shape), lay.two_sided, b.dtype, b.device)
                buckets.setdefault(key, []).append((i, k, b, gs[k] if grafted else None, s[f"L_root_{k}"],
                                                    s.get(f"R_root_{k}")))
        for (_, two_sided, _, _), items in buckets.items():
            x = torch.bmm(torch.stack([it[4] for it in items]), torch.stack([it[2] for it in items]))
            if two_sided:
                x = torch.bmm(x, torch.stack([it[5] for it in items]))
            if grafted:
                target = torch.linalg.vector_norm(torch.stack([it[3] for it in items]), dim=(1, 2))
                norm = torch.linalg.vector_norm(x, dim=(1, 2)).clamp_min(torch.finfo(x.dtype).tiny)
                x = x * (target / norm)[:, None, None]
            for j, (i, k, *_) in enumerate(items):
                pieces[i][k] = x[j]
        for i, blocks in pieces.items():
            p = ctx.params[i]
            out[i] = from_blocks(blocks, self.layout(p)).reshape(p.shape).to(p.dtype)
        if diag:
            out_diag = self._diagonal([updates[i] for i in diag], [ctx.states[i] for i in diag],
                                      [ctx.steps[i] for i in diag], ctx)
            for i, u in zip(diag, out_diag):
                out[i] = u.to(ctx.params[i].dtype)
        return out

    def _diagonal(self, m: list[Tensor], states: list[dict], steps: list[int], ctx: StepContext) -> list[Tensor]:
        """Shampoo on 1 x 1 blocks: m̂ / sqrt(L_diag / c2 + ε)."""
        factors = [s["L_diag"] for s in states]
        c2 = [1.0 - self.beta2**t if self.bias_correction and self.beta2 < 1.0 else 1.0 for t in steps]
        denom = ctx.ops.div(factors, c2)
        ctx.ops.add_(denom, self.epsilon)
        ctx.ops.sqrt_(denom)
        return ctx.ops.div([u.to(f.dtype) for u, f in zip(m, factors)], denom)
