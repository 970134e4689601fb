"""AdaBelief (Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
Gradients", NeurIPS 2020, Algorithm 2; weight decay and AMSGrad as in the authors' code).

    g <- g + wd·p (coupled)  or  p <- p (1 - lr·wd) (decoupled, the default)
    m <- β1 m + (1-β1) g;   s <- β2 s + (1-β2)(g - m)² + ε;   ŝ = max(ŝ, s) with amsgrad
    p <- p - lr · (m / (1-β1^t)) / (sqrt(ŝ / (1-β2^t)) + ε)
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment
from distopt.accumulators.belief import BeliefMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, betas, ge
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.scenarios.regularization import AddWeightDecay


@register
class AdaBelief(DistOptimizer):
    name = "adabelief"
    family = "first_order"
    reference = "pytorch_optimizer.AdaBelief"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": Hyper(1e-16, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
        "decoupled_weight_decay": Hyper(True, FLAG),
        "amsgrad": Hyper(False, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        decoupled, wd = group["decoupled_weight_decay"], group["weight_decay"]
        key = "max_exp_avg_var" if group["amsgrad"] else "exp_avg_var"
        return chain(
            AddWeightDecay(0.0 if decoupled else wd),
            BeliefMoment(b1, b2, group["eps"], amsgrad=group["amsgrad"]),
            FirstMoment(b1),
            RootMomentPreconditioner(group["eps"], b1, b2, key=key),
            DecoupledWeightDecay(wd if decoupled else 0.0, group["lr"]),
            ApplyLR(group["lr"]),
        )
