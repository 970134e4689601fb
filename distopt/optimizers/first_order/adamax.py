"""Adamax (Kingma & Ba, ICLR 2015, Algorithm 2), as torch.optim.Adamax.

    g <- g + wd·p;   m <- β1 m + (1-β1) g;   u <- max(β2 u, |g| + ε)
    p <- p - lr / (1 - β1^t) · m / u
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment
from distopt.accumulators.infinity_norm import InfinityNorm
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, WEIGHT_DECAY, betas, ge
from distopt.preconditioners import ApplyLR
from distopt.preconditioners.infinity import InfinityNormPreconditioner
from distopt.scenarios import AddWeightDecay


@register
class Adamax(DistOptimizer):
    name = "adamax"
    family = "first_order"
    reference = "torch.optim.Adamax"
    hyper = {
        "lr": Hyper(2e-3, ge(0.0)),
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            AddWeightDecay(group["weight_decay"]),
            InfinityNorm(b2, group["eps"], key="exp_inf"),
            FirstMoment(b1),
            InfinityNormPreconditioner(b1, key="exp_inf"),
            ApplyLR(group["lr"]),
        )
