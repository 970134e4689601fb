"""RAdam (Liu et al., ICLR 2020), as torch.optim.RAdam.

    g <- g + wd·p (coupled)   or   p <- p (1 - lr·wd) (decoupled_weight_decay)
    m <- β1 m + (1-β1) g;   v <- β2 v + (1-β2) g²;   ρ_t = ρ_∞ - 2tβ2^t / (1-β2^t)
    p <- p - lr · m/(1-β1^t) · r_t sqrt(1-β2^t) / (sqrt(v) + ε)   if ρ_t > 5,  else  p - lr · m/(1-β1^t)
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, betas
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.rectified import RectifiedPreconditioner
from distopt.scenarios import AddWeightDecay


@register
class RAdam(DistOptimizer):
    name = "radam"
    family = "first_order"
    reference = "torch.optim.RAdam"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
        "decoupled_weight_decay": Hyper(False, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        wd, decoupled = group["weight_decay"], bool(group["decoupled_weight_decay"])
        return chain(
            AddWeightDecay(0.0 if decoupled else wd),
            SecondMoment(b2),
            FirstMoment(b1),
            RectifiedPreconditioner(group["eps"], b1, b2),
            DecoupledWeightDecay(wd if decoupled else 0.0, group["lr"]),
            ApplyLR(group["lr"]),
        )
