"""ADOPT (Taniguchi et al., NeurIPS 2024): Adam with the second moment of the PREVIOUS step
and normalisation before the momentum, which converges for any β2.

    t = 1:  v <- g²   (no parameter update)
    t > 1:  m <- β1 m + (1-β1) clip(g / max(sqrt(v), ε), (t-1)^e);  p <- p - lr·m;
            v <- β2 v + (1-β2) g²

Weight decay: coupled (g <- g + wd·p, every call) or, with ``decouple=True``,
p <- p (1 - lr·wd) from the first real update on (the authors' code).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.adopt import AdoptMoments, DelayedDecoupledWeightDecay
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, Rule, betas, ge
from distopt.preconditioners.apply import ApplyLR
from distopt.scenarios.regularization import AddWeightDecay

OPTIONAL_EXPONENT = Rule(
    lambda x: x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x < float("inf")),
    "None (no clipping) or a finite float >= 0",
)


@register
class ADOPT(DistOptimizer):
    name = "adopt"
    family = "first_order"
    reference = "pytorch_optimizer.ADOPT (clip_lambda shifted to (step-1)**0.25) and a naive loop of the paper"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.9999), betas(2)),
        "eps": Hyper(1e-6, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
        "decouple": Hyper(False, FLAG),
        "clip_exponent": Hyper(0.25, OPTIONAL_EXPONENT),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        decoupled = group["decouple"]
        return chain(
            AddWeightDecay(0.0 if decoupled else group["weight_decay"]),
            AdoptMoments(b1, b2, group["eps"], group["clip_exponent"]),
            DelayedDecoupledWeightDecay(group["weight_decay"] if decoupled else 0.0, group["lr"]),
            ApplyLR(group["lr"]),
        )
