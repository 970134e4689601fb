"""Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023, Algorithm 2).

    u = sign(β1 m + (1-β1) g);   m <- β2 m + (1-β2) g;   p <- p (1 - lr·wd) - lr·u
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.lion import LionMomentum
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import WEIGHT_DECAY, betas, ge
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.sign import Sign


@register
class Lion(DistOptimizer):
    name = "lion"
    family = "first_order"
    reference = "lion_pytorch.Lion"
    hyper = {
        "lr": Hyper(1e-4, ge(0.0)),
        "betas": Hyper((0.9, 0.99), betas(2)),
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            LionMomentum(b1, b2), Sign(), DecoupledWeightDecay(group["weight_decay"], group["lr"]), ApplyLR(group["lr"])
        )
