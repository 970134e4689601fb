"""ZO-SGD with heavy-ball momentum (ZO-Bench's ZO-SGD-MMT; Zhang et al., ICML 2024), torch.optim.SGD's
momentum convention applied to the zeroth-order estimate:

    g = (1/n) Σ_k c_k z_k + wd·θ;   b_1 = g,  b_t = μ b_{t-1} + g;   θ <- θ - lr b_t
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import HeavyBall
from distopt.core import Chain, Hyper, chain, register
from distopt.core.hyper import interval
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import ZOEstimate
from distopt.zo.optimizer import ZOOptimizer, zo_hyper


@register
class ZOSGDMomentum(ZOOptimizer):
    """Zeroth-order SGD with momentum (buffer ``momentum_buffer``, one param-sized tensor)."""

    name = "zo_sgd_momentum"
    reference = "naive float64 ZO-SGD-MMT loop (ZO-Bench) in tests/reference/test_zeroth_order.py"
    hyper = zo_hyper(momentum=Hyper(0.9, interval(0.0, 1.0)))

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(ZOEstimate(group["maximize"]), AddWeightDecay(group["weight_decay"]),
                     HeavyBall(group["momentum"]), ApplyLR(group["lr"]))
