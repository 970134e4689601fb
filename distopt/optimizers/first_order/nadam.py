"""NAdam (Dozat, ICLR 2016 workshop) and NAdamW, as torch.optim.NAdam.

    g <- g + wd·p (coupled)   or   p <- p (1 - lr·wd) (decoupled; NAdamW)
    μ_t = β1 (1 - ½·0.96^{tψ}),  Π_t = Π_{t-1} μ_t,  m <- β1 m + (1-β1) g,  v <- β2 v + (1-β2) g²
    p <- p - lr · [(1-μ_t)/(1-Π_t) g + μ_{t+1}/(1-Π_t μ_{t+1}) m] / (sqrt(v / (1-β2^t)) + ε)

``nadamw`` is NAdam with decoupled weight decay always on (torch.optim.NAdam with
``decoupled_weight_decay=True``), default ``weight_decay=1e-2``.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import SecondMoment
from distopt.accumulators.nadam_momentum import NAdamMomentum
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, WEIGHT_DECAY, betas, ge
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay, RootMomentPreconditioner
from distopt.scenarios import AddWeightDecay

NADAM_HYPER = {
    "lr": Hyper(2e-3, ge(0.0)),
    "betas": Hyper((0.9, 0.999), betas(2)),
    "eps": EPS,
    "weight_decay": WEIGHT_DECAY,
    "momentum_decay": Hyper(4e-3, ge(0.0)),
}


def nadam_recipe(group: Mapping[str, Any], decoupled: bool) -> Chain:
    b1, b2 = group["betas"]
    wd = group["weight_decay"]
    return chain(
        AddWeightDecay(0.0 if decoupled else wd),
        SecondMoment(b2),
        NAdamMomentum(b1, group["momentum_decay"]),
        RootMomentPreconditioner(group["eps"], 0.0, b2),
        DecoupledWeightDecay(wd if decoupled else 0.0, group["lr"]),
        ApplyLR(group["lr"]),
    )


@register
class NAdam(DistOptimizer):
    name = "nadam"
    family = "first_order"
    reference = "torch.optim.NAdam"
    hyper = {**NADAM_HYPER, "decoupled_weight_decay": Hyper(False, FLAG)}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return nadam_recipe(group, bool(group["decoupled_weight_decay"]))


@register
class NAdamW(DistOptimizer):
    name = "nadamw"
    family = "first_order"
    reference = "torch.optim.NAdam(decoupled_weight_decay=True)"
    hyper = {**NADAM_HYPER, "weight_decay": Hyper(1e-2, WEIGHT_DECAY.rule)}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return nadam_recipe(group, True)
