"""AdamP (Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant
Weights", ICLR 2021, Algorithm 2 and the authors' code clovaai/AdamP).

    m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²;  u = m̂ (or β1 m̂ + (1-β1) g/c1, Nesterov) / (sqrt(v̂) + ε)
    u <- Π_p(u) where p looks scale invariant (see ScaleInvariantProjection), ratio = wd_ratio there
    p <- p (1 - lr·wd·ratio) - lr·u
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.accumulators.nesterov_first_moment import NesterovFirstMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, betas, ge, interval
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.preconditioners.projection import ScaleInvariantProjection

PROJECTION_HYPER = {
    "delta": Hyper(0.1, ge(0.0)),
    "wd_ratio": Hyper(0.1, interval(0.0, 1.0, closed_high=True)),
}


@register
class AdamP(DistOptimizer):
    name = "adamp"
    family = "first_order"
    reference = "pytorch_optimizer.AdamP (eps=0); naive loop of the authors' algorithm (eps>0)"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "nesterov": Hyper(False, FLAG),
        **PROJECTION_HYPER,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            SecondMoment(b2),
            NesterovFirstMoment(b1) if group["nesterov"] else FirstMoment(b1),
            RootMomentPreconditioner(group["eps"], b1, b2),
            ScaleInvariantProjection(
                group["delta"], group["wd_ratio"], group["eps"], group["weight_decay"], group["lr"]
            ),
            ApplyLR(group["lr"]),
        )
