"""LARS (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks", 2017, Alg. 1).

    λ = η ||p|| / (||g|| + wd ||p||)   (1 where ||p|| or the denominator is 0), on every tensor
    b <- μ b + λ (g + wd p);   u = λ (g + wd p) + μ b (Nesterov) or b;   p <- p - lr · u

The global lr multiplies the momentum buffer's output (torch.optim.SGD's convention) instead of
entering the buffer as in the paper; the two are equal for a constant lr. ``adapt_vectors=False``
leaves tensors with ndim <= 1 without ratio and decay (plain momentum SGD there), as
pytorch_optimizer.LARS always does.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import HeavyBall
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, ge, interval
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.trust_ratio import LARSTrustRatio


@register
class LARS(DistOptimizer):
    name = "lars"
    family = "first_order"
    reference = "naive loop of the paper's Algorithm 1 (tests/reference/test_first_order_a.py)"
    hyper = {
        "lr": LR,
        "momentum": Hyper(0.9, interval(0.0, 1.0)),
        "weight_decay": WEIGHT_DECAY,
        "adapt_vectors": Hyper(True, FLAG),
        "trust_coefficient": Hyper(1e-3, ge(0.0)),
        "nesterov": Hyper(False, FLAG),
    }

    def __init__(self, params: Any, **hparams: Any) -> None:
        super().__init__(params, **hparams)
        for group in self.param_groups:
            if group["nesterov"] and group["momentum"] <= 0:
                raise ValueError("lars: nesterov=True requires momentum > 0")

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            LARSTrustRatio(group["trust_coefficient"], group["weight_decay"], group["adapt_vectors"]),
            HeavyBall(group["momentum"], 0.0, group["nesterov"]),
            ApplyLR(group["lr"]),
        )
