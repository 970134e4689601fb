"""ZO-SignSGD (Liu et al., "signSGD via Zeroth-Order Oracle", ICLR 2019; ZO-Bench's ZO-SGD-Sign,
Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning: A
Benchmark", ICML 2024):

    g = (1/n) Σ_k c_k z_k (as zo_sgd);   θ <- θ - lr (sign(g) + wd·θ)

Weight decay is added after the sign, as in ZO-Bench's update (written here as the equivalent
decoupled form θ <- θ (1 - lr·wd) - lr sign(g)).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, chain, register
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.sign import Sign
from distopt.zo.estimator import ZOEstimate
from distopt.zo.optimizer import ZO_HYPER, ZOOptimizer


@register
class ZOSGDSign(ZOOptimizer):
    """Zeroth-order signSGD."""

    name = "zo_sgd_sign"
    reference = "naive float64 ZO-SignSGD loop (Liu et al. 2019; ZO-Bench) in tests/reference/test_zeroth_order.py"
    hyper = ZO_HYPER

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(ZOEstimate(group["maximize"]), Sign(), DecoupledWeightDecay(group["weight_decay"], group["lr"]),
                     ApplyLR(group["lr"]))
