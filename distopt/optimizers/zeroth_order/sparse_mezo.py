"""Sparse-MeZO (Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order
LLM Fine-Tuning", 2024, arXiv:2402.15751): perturb and update only small-magnitude weights,

    m = 1[|θ| <= h];   c = (f(θ + ε m⊙z) - f(θ - ε m⊙z)) / (2ε);   θ <- θ - lr (c·m⊙z + wd·θ)

h (state ``mask_threshold``) is each tensor's ``ceil((1 - sparsity)·N)``-th smallest |θ|, fixed at
the first step; the mask is recomputed from θ whenever it is needed and never stored.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, Hyper, chain, register
from distopt.core.hyper import interval
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import MaskedZOEstimate
from distopt.zo.optimizer import ZOOptimizer, zo_hyper


@register
class SparseMeZO(ZOOptimizer):
    """MeZO restricted to the smallest-magnitude fraction ``1 - sparsity`` of each tensor."""

    name = "sparse_mezo"
    reference = "naive float64 Sparse-MeZO loop (Liu et al. 2024) in tests/reference/test_zeroth_order.py"
    hyper = zo_hyper(sparsity=Hyper(0.75, interval(0.0, 1.0)))

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(MaskedZOEstimate(group["sparsity"], maximize=group["maximize"]),
                     AddWeightDecay(group["weight_decay"]), ApplyLR(group["lr"]))
