"""NovoGrad (Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
Training of Deep Networks", 2019, Algorithm 1).

    v_1 = ||g_1||²,  v <- β2 v + (1-β2) ||g||²          (one scalar per tensor)
    u = g / (sqrt(v) + ε) + wd·p
    m_1 = u,  m <- β1 m + u  (or (1-β1) u with grad_averaging);   p <- p - lr·m
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import HeavyBall
from distopt.accumulators.layerwise import LayerwiseNormalize
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, betas
from distopt.preconditioners.apply import ApplyLR


@register
class NovoGrad(DistOptimizer):
    name = "novograd"
    family = "first_order"
    reference = "pytorch_optimizer.NovoGrad"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.95, 0.98), betas(2)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "grad_averaging": Hyper(False, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            LayerwiseNormalize(b2, group["eps"], group["weight_decay"]),
            HeavyBall(b1, b1 if group["grad_averaging"] else 0.0),
            ApplyLR(group["lr"]),
        )
