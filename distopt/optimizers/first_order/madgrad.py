"""MADGRAD (Defazio & Jelassi, 2021): momentumized adaptive dual averaging with a cube-root
denominator; coupled (L2) weight decay.

    g <- g + wd·p;  λ_t = lr·sqrt(t);  s += λ_t g;  ν += λ_t g²
    z = x_0 - s / (ν^{1/3} + ε);        p <- (1 - c) p + c z,  c = 1 - momentum

λ_t follows the paper exactly; the authors' code (and pytorch_optimizer) use ``lr + eps`` in
place of ``lr``, which the reference test compensates for.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.dual_averaging import CubeRootDualAveraging, InterpolateParams
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import WEIGHT_DECAY, ge, interval
from distopt.scenarios.regularization import AddWeightDecay


@register
class MADGRAD(DistOptimizer):
    name = "madgrad"
    family = "first_order"
    reference = "pytorch_optimizer.MADGRAD (lr shifted by -eps: the package steps with lr + eps)"
    hyper = {
        "lr": Hyper(1e-2, ge(0.0)),
        "momentum": Hyper(0.9, interval(0.0, 1.0)),
        "eps": Hyper(1e-6, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        momentum = group["momentum"]
        return chain(
            AddWeightDecay(group["weight_decay"]),
            CubeRootDualAveraging(group["lr"], group["eps"], store_anchor=momentum > 0),
            InterpolateParams(1.0 - momentum),
        )
