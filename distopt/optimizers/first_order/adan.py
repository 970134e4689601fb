"""Adan (Xie et al., 2022): adaptive Nesterov momentum through the gradient difference, with
proximal (decoupled) weight decay as in the paper:

    d = g - g_prev;  m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) d;  n <- β3 n + (1-β3)(g + β2 d)²
    u = m/(1-β1^t) + β2 v/(1-β2^t);   p <- (p - lr · u / (sqrt(n/(1-β3^t)) + ε)) / (1 + lr·wd)
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.gradient_difference import AdanMoments
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, LR, WEIGHT_DECAY, betas
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.preconditioners.proximal import ProximalWeightDecay


@register
class Adan(DistOptimizer):
    name = "adan"
    family = "first_order"
    reference = "pytorch_optimizer.Adan (weight_decouple=False: the proximal decay of the paper)"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.98, 0.92, 0.99), betas(3)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2, b3 = group["betas"]
        return chain(
            AdanMoments(b1, b2, b3),
            RootMomentPreconditioner(group["eps"], 0.0, b3, key="exp_avg_sq"),
            ApplyLR(group["lr"]),
            ProximalWeightDecay(group["weight_decay"], group["lr"]),
        )
