"""LAMB (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
ICLR 2020, Algorithm 2), with the paper's bias correction and φ = identity.

    m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²;  r = m̂ / (sqrt(v̂) + ε)
    u = r + wd·p;          p <- p - lr · ||p|| / ||u|| · u      (ratio 1 where a norm is 0)

``adapt_vectors=False`` leaves tensors with ndim <= 1 without ratio and decay (plain Adam there),
as the BERT LAMB code does for biases and LayerNorm.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, betas, ge
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.preconditioners.trust_ratio import LAMBTrustRatio


@register
class Lamb(DistOptimizer):
    name = "lamb"
    family = "first_order"
    reference = "naive loop of the paper's Algorithm 2 (tests/reference/test_first_order_a.py); pytorch_optimizer.Lamb"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": Hyper(1e-6, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
        "adapt_vectors": Hyper(True, FLAG),
        "bias_correction": Hyper(True, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            SecondMoment(b2),
            FirstMoment(b1),
            RootMomentPreconditioner(group["eps"], b1, b2, bias_correct=group["bias_correction"]),
            LAMBTrustRatio(group["weight_decay"], group["adapt_vectors"]),
            ApplyLR(group["lr"]),
        )
