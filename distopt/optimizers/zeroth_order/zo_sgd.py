"""ZO-SGD as MeZO runs it (Malladi et al., "Fine-Tuning Language Models with Just Forward Passes",
NeurIPS 2023, Algorithm 1, n-SPSA):

    c_k = (f(θ + ε z_k) - f(θ - ε z_k)) / (2ε),   g = (1/n) Σ_k c_k z_k
    θ <- θ - lr (g + wd·θ)

z_k regenerated from (seed, step, k), never stored; parameters restored exactly after probing.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, chain, register
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import ZOEstimate
from distopt.zo.optimizer import ZO_HYPER, ZOOptimizer


@register
class ZOSGD(ZOOptimizer):
    """MeZO: memory-efficient zeroth-order SGD (SPSA with regenerated directions)."""

    name = "zo_sgd"
    reference = "naive float64 MeZO loop (Malladi et al. 2023, Alg. 1) in tests/reference/test_zeroth_order.py"
    hyper = ZO_HYPER

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(ZOEstimate(group["maximize"]), AddWeightDecay(group["weight_decay"]), ApplyLR(group["lr"]))
