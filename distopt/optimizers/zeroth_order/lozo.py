"""LOZO (Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", ICLR 2025, Algorithm 1): low-rank perturbations for matrices,

    d = U Vᵀ   (U: rows x r drawn every step; V: cols x r drawn every ``interval`` steps)
    c = (f(θ + ε d) - f(θ - ε d)) / (2ε);   θ <- θ - lr (c·U Vᵀ + wd·θ)

Parameters with fewer than two dimensions use ordinary Gaussian z (as the authors' code); a
parameter of more dimensions is seen as shape[0] x rest. U and V are regenerated from counters
(V from the step's ``interval`` epoch), so nothing is stored; LOZO-M's momentum is not included.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, Hyper, chain, register
from distopt.core.hyper import integer
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import LowRankZOEstimate
from distopt.zo.optimizer import ZOOptimizer, zo_hyper


@register
class LOZO(ZOOptimizer):
    """Low-rank zeroth-order SGD (no optimizer state)."""

    name = "lozo"
    reference = "naive float64 LOZO loop (Chen et al. 2025, Alg. 1) in tests/reference/test_zeroth_order.py"
    hyper = zo_hyper(rank=Hyper(2, integer(1)), interval=Hyper(50, integer(1)))

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(LowRankZOEstimate(group["rank"], group["interval"], group["maximize"]),
                     AddWeightDecay(group["weight_decay"]), ApplyLR(group["lr"]))
