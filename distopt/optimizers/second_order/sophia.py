"""Sophia, SophiaH variant (Liu, Li, Hall, Liang & Ma, "Sophia: A Scalable Stochastic
Second-order Optimizer for Language Model Pre-training", ICLR 2024, Algorithm 3 with the
Hutchinson estimator):

    m_t = β1 m_{t-1} + (1 - β1) g_t
    if (t - 1) % k == 0:  ĥ_t = u ⊙ (H u), u ~ N(0, I);   h_t = β2 h_{t-k} + (1 - β2) ĥ_t
    else:                 h_t = h_{t-1}
    p <- p (1 - lr·wd);   p <- p - lr · clip(m_t / max(ρ·h_t, ε), 1)

k is ``update_each`` (paper: 10), ρ is ``rho`` (the paper's γ; 0.01 for SophiaH), ε is ``eps``
(must be > 0: it is the floor under non-positive curvature, where the step becomes lr·sign(m)).
No bias correction (as in the paper). ``weight_decay`` defaults to 0 like torch.optim; the
paper pre-trains GPT-2 with 0.1. ``hessian_distribution`` may switch the probes to
Rademacher. The official code's ``rho·bs·h + 1e-15`` denominator has no max(·, ε) and flips
the step where a Hutchinson estimate is negative; this follows the paper.

**Gradients must carry a graph**: ``loss.backward(create_graph=True)`` or a closure doing so
(``closure_kind = "create_graph"``). Probes come from ``torch.Generator`` seeded by ``seed``
(rule in distopt/estimators/hutchinson.py), one HVP per param group.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.moments import FirstMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import LR, WEIGHT_DECAY, betas, gt, integer, one_of
from distopt.estimators.hutchinson import HutchinsonDiagonal
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.hessian_diagonal import ClippedHessianPreconditioner


@register
class Sophia(DistOptimizer):
    __doc__ = __doc__
    name = "sophia"
    family = "second_order"
    keep_state_dtypes = True
    reference = "naive float64 loop of Algorithm 3 (tests/reference/test_curvature.py)"
    closure_kind = "create_graph"
    hyper = {
        "lr": Hyper(1e-4, LR.rule),
        "betas": Hyper((0.965, 0.99), betas(2)),
        "rho": Hyper(0.01, gt(0.0)),
        "eps": Hyper(1e-12, gt(0.0)),
        "weight_decay": WEIGHT_DECAY,  # the paper's GPT-2 runs use 0.1
        "update_each": Hyper(10, integer(1)),
        "n_samples": Hyper(1, integer(1)),
        "hessian_distribution": Hyper("gaussian", one_of("gaussian", "rademacher")),
        "seed": Hyper(0, integer(0)),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            HutchinsonDiagonal(group["seed"], group["update_each"], group["n_samples"],
                               group["hessian_distribution"], beta=b2, owner=cls.name),
            FirstMoment(b1),
            ClippedHessianPreconditioner(group["rho"], group["eps"]),
            DecoupledWeightDecay(group["weight_decay"]),
            ApplyLR(),
        )
