"""ZO-Adam (ZO-AdaMM, Chen et al., "ZO-AdaMM: Zeroth-Order Adaptive Momentum Method for Black-Box
Optimization", NeurIPS 2019; ZO-Bench's ZO-Adam, Zhang et al., ICML 2024): Adam on the
zeroth-order estimate, with coupled weight decay as torch.optim.Adam:

    g = (1/n) Σ_k c_k z_k + wd·θ;  m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²
    θ <- θ - lr (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + adam_eps)

``eps`` is the perturbation scale (as in every zeroth-order recipe); Adam's denominator epsilon
is ``adam_eps``.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.core import Chain, Hyper, chain, register
from distopt.core.hyper import betas, ge
from distopt.preconditioners import ApplyLR, RootMomentPreconditioner
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import ZOEstimate
from distopt.zo.optimizer import ZOOptimizer, zo_hyper


@register
class ZOAdam(ZOOptimizer):
    """Zeroth-order Adam (two param-sized moment buffers)."""

    name = "zo_adam"
    reference = "naive float64 ZO-Adam loop (ZO-AdaMM / ZO-Bench) in tests/reference/test_zeroth_order.py"
    hyper = zo_hyper(betas=Hyper((0.9, 0.999), betas(2)), adam_eps=Hyper(1e-8, ge(0.0)))

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(ZOEstimate(group["maximize"]), AddWeightDecay(group["weight_decay"]), SecondMoment(b2),
                     FirstMoment(b1), RootMomentPreconditioner(group["adam_eps"], b1, b2), ApplyLR(group["lr"]))
