"""RMSprop (Tieleman & Hinton, 2012; centered: Graves, 2013), as torch.optim.RMSprop.

    g <- g + wd·p;   v <- α v + (1-α) g²;   ḡ <- α ḡ + (1-α) g  (centered)
    d = sqrt(v - ḡ²) + ε  (centered)  or  sqrt(v) + ε
    b <- μ b + g / d  (momentum > 0; else b = g / d);   p <- p - lr·b
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import SecondMoment
from distopt.accumulators.centered import SideMean
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, WEIGHT_DECAY, ge, interval
from distopt.preconditioners import ApplyLR, RootMomentPreconditioner
from distopt.preconditioners.centered import CenteredRootPreconditioner
from distopt.preconditioners.momentum import PreconditionedHeavyBall
from distopt.scenarios import AddWeightDecay


@register
class RMSprop(DistOptimizer):
    name = "rmsprop"
    family = "first_order"
    reference = "torch.optim.RMSprop"
    hyper = {
        "lr": Hyper(1e-2, ge(0.0)),
        "alpha": Hyper(0.99, interval(0.0, 1.0, closed_high=True)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "momentum": Hyper(0.0, interval(0.0, 1.0)),
        "centered": Hyper(False, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        alpha, eps = group["alpha"], group["eps"]
        if group["centered"]:
            moments = chain(SecondMoment(alpha, key="square_avg"), SideMean(alpha, key="grad_avg"),
                            CenteredRootPreconditioner(eps, key="square_avg", mean_key="grad_avg"))
        else:
            moments = chain(SecondMoment(alpha, key="square_avg"),
                            RootMomentPreconditioner(eps, key="square_avg", bias_correct=False))
        return chain(
            AddWeightDecay(group["weight_decay"]),
            moments,
            PreconditionedHeavyBall(group["momentum"]),
            ApplyLR(group["lr"]),
        )
