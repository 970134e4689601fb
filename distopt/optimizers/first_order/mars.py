"""MARS-AdamW (Yuan et al., 2024, "MARS: Unleashing the Power of Variance Reduction for
Training Large Models"), approximate variant, applied to every tensor:

    c_t = g_t + γ β1/(1-β1) (g_t - g_{t-1});   c̃_t = c_t / max(1, ||c_t||)   (per tensor)
    m <- β1 m + (1-β1) c̃;  v <- β2 v + (1-β2) c̃²
    p <- p (1 - lr·wd) - lr · (m/(1-β1^t)) / (sqrt(v/(1-β2^t)) + ε)

ε sits outside the bias correction as in the authors' code (pytorch_optimizer puts it inside).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, WEIGHT_DECAY, betas, ge
from distopt.optimizers.first_order.adam import adam_moments
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.scenarios.variance_reduction import ClipTensorNorm, MarsCorrection


@register
class MARS(DistOptimizer):
    name = "mars"
    family = "first_order"
    reference = "naive loop of the paper's MARS-AdamW (and pytorch_optimizer.MARS with eps=0, optimize_1d=True)"
    hyper = {
        "lr": Hyper(3e-3, ge(0.0)),
        "betas": Hyper((0.95, 0.99), betas(2)),
        "gamma": Hyper(0.025, ge(0.0)),
        "eps": EPS,
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            MarsCorrection(group["gamma"], group["betas"][0]),
            ClipTensorNorm(1.0),
            adam_moments(group),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(group["lr"]),
        )
