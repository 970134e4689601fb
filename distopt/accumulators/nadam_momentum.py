"""Φ operator: NAdam's Nesterov momentum with the momentum-decay schedule.

    μ_t = β1 (1 - ½·0.96^{t ψ}),   Π_t = Π_{t-1} μ_t,   m_t = β1 m_{t-1} + (1 - β1) g_t
    u_t = (1 - μ_t) / (1 - Π_t) · g_t + μ_{t+1} / (1 - Π_t μ_{t+1}) · m_t

Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016 workshop (Algorithm 2), with
the μ schedule of torch.optim.NAdam (ψ = ``momentum_decay``). A following
:class:`~distopt.preconditioners.RootMomentPreconditioner` (β1 = 0) divides by
``sqrt(v_t / (1 - β2^t)) + ε``.

``mu_product`` (Π_t) is kept like torch.optim.NAdam keeps it: rounded to torch's scalar
dtype (float32 unless the default dtype is float64) after every product, which is what
makes the results match torch to the last bits. It is stored as a Python float so that
``load_state_dict`` cannot cast it to the parameter's dtype (torch would round it to
bfloat16 for bfloat16 parameters).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


def _scalar_dtype() -> torch.dtype:
    """torch.optim's dtype for per-parameter scalars (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class NAdamMomentum(Operator):
    """Keeps ``exp_avg`` and ``mu_product``; returns the Nesterov mix of ``g`` and ``m``."""

    stage = Stage.PHI

    def __init__(self, beta1: float, momentum_decay: float = 4e-3) -> None:
        self.beta1, self.momentum_decay = beta1, momentum_decay

    def init(self, param: Tensor) -> dict[str, Tensor | float]:
        return {"exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format), "mu_product": 1.0}

    def mu(self, step: int) -> float:
        return self.beta1 * (1.0 - 0.5 * 0.96 ** (step * self.momentum_decay))

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        m = [s["exp_avg"] for s in ctx.states]
        ctx.ops.lerp_(m, updates, 1.0 - self.beta1)
        grad_scale, avg_scale = [], []
        for state, t in zip(ctx.states, ctx.steps):
            mu, mu_next = self.mu(t), self.mu(t + 1)
            product = torch.tensor(float(state["mu_product"]), dtype=_scalar_dtype()).mul_(mu).item()
            state["mu_product"] = product
            grad_scale.append((1.0 - mu) / (1.0 - product))
            avg_scale.append(mu_next / (1.0 - product * mu_next))
        out = ctx.ops.mul(updates, grad_scale)
        ctx.ops.add_(out, ctx.ops.mul(m, avg_scale))
        return out
