"""LaProp (Ziyin, Wang & Ueda, "LaProp: Separating Momentum and Adaptivity in Adam", 2020, Alg. 1).

    v <- β2 v + (1-β2) g²;   m <- β1 m + (1-β1) g / (sqrt(v / (1-β2^t)) + ε)
    p <- p (1 - lr·wd) - lr · m / (1-β1^t)                 (decoupled weight decay)
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.accumulators.normalized_gradient import RootMomentNormalize
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import LR, WEIGHT_DECAY, betas, ge
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.moment_debias import DebiasMoment


@register
class LaProp(DistOptimizer):
    name = "laprop"
    family = "first_order"
    reference = "naive loop of the paper's Algorithm 1 (tests/reference/test_first_order_a.py); pytorch_optimizer.LaProp"
    hyper = {
        "lr": Hyper(4e-4, LR.rule),
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": Hyper(1e-15, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            SecondMoment(b2),
            RootMomentNormalize(group["eps"], b2),
            FirstMoment(b1),
            DebiasMoment(b1),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(group["lr"]),
        )
