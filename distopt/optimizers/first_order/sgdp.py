"""SGDP (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", ICLR 2021, Algorithm 1 and the authors' code clovaai/AdamP).

    b <- μ b + g;   u = g + μ b (Nesterov) or b        (the buffer itself is never projected)
    u <- Π_p(u) where p looks scale invariant (see ScaleInvariantProjection), ratio = wd_ratio there
    p <- p (1 - lr·wd·ratio / (1-μ)) - lr·u
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import HeavyBall
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, interval
from distopt.optimizers.first_order.adamp import PROJECTION_HYPER
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.projection import ScaleInvariantProjection


@register
class SGDP(DistOptimizer):
    name = "sgdp"
    family = "first_order"
    reference = "pytorch_optimizer.SGDP"
    hyper = {
        "lr": LR,
        "momentum": Hyper(0.0, interval(0.0, 1.0)),
        "weight_decay": WEIGHT_DECAY,
        "nesterov": Hyper(False, FLAG),
        "eps": EPS,
        **PROJECTION_HYPER,
    }

    def __init__(self, params: Any, **hparams: Any) -> None:
        super().__init__(params, **hparams)
        for group in self.param_groups:
            if group["nesterov"] and group["momentum"] <= 0:
                raise ValueError("sgdp: nesterov=True requires momentum > 0")

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        mu = group["momentum"]
        return chain(
            HeavyBall(mu, 0.0, group["nesterov"]),
            ScaleInvariantProjection(
                group["delta"], group["wd_ratio"], group["eps"], group["weight_decay"], group["lr"], 1.0 / (1.0 - mu)
            ),
            ApplyLR(group["lr"]),
        )
