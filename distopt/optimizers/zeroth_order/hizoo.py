"""HiZOO (Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed
Zeroth-Order Optimizer", ICLR 2025, Algorithm 1 and the authors' ``zo_Hessian_step_update``):
a diagonal Hessian estimate H (H_0 = 1, state ``hessian``) shapes the perturbation and the step:

    d = z / sqrt(H_t);   l± = f(θ ± ε d),  l0 = f(θ)
    H_{t+1} = (1 - α) H_t + α |l+ + l- - 2 l0| / (2ε²) · H_t z²
    θ <- θ - lr ((l+ - l-) / (2ε) · z / sqrt(H_{t+1}) + wd·θ)

α is ``hessian_smooth`` (the authors' scripts use a constant 1e-8 .. 1e-6). Three forward passes a
step; two-sided only.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, Hyper, chain, register
from distopt.core.hyper import interval, one_of
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import HessianZOEstimate
from distopt.zo.optimizer import ZOOptimizer, zo_hyper


@register
class HiZOO(ZOOptimizer):
    """Hessian-informed zeroth-order SGD (one param-sized Hessian-diagonal buffer)."""

    name = "hizoo"
    reference = "naive float64 HiZOO loop (Zhao et al. 2025, Alg. 1) in tests/reference/test_zeroth_order.py"
    hyper = zo_hyper(two_sided=Hyper(True, one_of(True)), hessian_smooth=Hyper(1e-6, interval(0.0, 1.0, True)))

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(HessianZOEstimate(group["hessian_smooth"], group["maximize"]),
                     AddWeightDecay(group["weight_decay"]), ApplyLR(group["lr"]))
