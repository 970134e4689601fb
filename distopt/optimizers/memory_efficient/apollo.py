"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
MLSys 2025, arXiv:2412.05270, Algorithm 1), with AdamW for the parameters that are not matrices.

Matrices (ndim >= 2, viewed as (shape[0], -1)) of a group with ``use_apollo=True``; r = min(rank, m, n):

    P ~ N(0, 1/r), regenerated from a seed that changes every update_proj_gap steps (never stored)
    R = Pᵀ G or G Pᵀ (side by ``proj_type``; "std": the smaller side)
    M, V <- Adam moments of R;   R̃ = (M / (1-β1^t)) / (sqrt(V / (1-β2^t)) + ε)
    apollo:      s_j = ||R̃_j|| / ||R_j|| per channel (column of G for left, row for right)
    apollo_mini: s = ||R̃|| / ||R|| (one factor per tensor; rank 1 by default)
    G̃ = G · diag(s);   if ||G̃|| > γ ||G̃_prev||: G̃ <- G̃ · γ ||G̃_prev|| / ||G̃||   (norm-growth limiter)
    p <- p (1 - lr·wd);   p <- p - lr · α · G̃                          (α = ``scale``)

Everything else (ndim < 2, and every param of a group with ``use_apollo=False``) runs
torch.optim.AdamW's math with the same lr, betas, eps and weight_decay. State per matrix:
``exp_avg``, ``exp_avg_sq`` (r·n or m·r each, param's dtype) and ``scaled_grad_norm`` (one
scalar); no projection matrix (see distopt/preconditioners/apollo_scaling.py for the seeds).
``norm_growth_limit=None`` switches the limiter off.

Differences from the authors' package apollo-torch 1.0.3 (``APOLLOAdamW``), where this
follows the paper: ``scale`` is α itself (the package multiplies by sqrt(scale), so its
APOLLO-Mini setting ``scale=128`` is α = sqrt(128), this recipe's default); the bias
corrections are inside R̃, so the limiter sees bias-corrected updates (the package folds
them into the step size after the limiter) and ε is added after the correction; no 1e-8 in
the ratio's denominator (s = 0 where ||R|| = 0); the limiter skips a step whose previous
norm is 0; weight decay acts on the pre-step weights (the package decays the updated ones);
the projection seeds are (seed, position in group, window) mixes, not the package's chain
from the param's global index; default ε = 1e-8 (1e-6); rank is capped at min(m, n).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, Rule, _real, betas, ge, integer, one_of
from distopt.optimizers.memory_efficient.galore import adamw_chain
from distopt.optimizers.second_order.muon import RouteByNdim
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.apollo_scaling import ApolloScaling
from distopt.preconditioners.norm_growth import NormGrowthLimiter
from distopt.scenarios.low_rank import PROJ_TYPES

LIMIT = Rule(lambda x: x is None or (_real(x) and x >= 1.0), "None or >= 1.0")

APOLLO_HYPER = {
    "lr": LR,
    "betas": Hyper((0.9, 0.999), betas(2)),
    "eps": EPS,
    "weight_decay": Hyper(0.0, WEIGHT_DECAY.rule),
    "rank": Hyper(256, integer(1)),
    "update_proj_gap": Hyper(200, integer(1)),
    "scale": Hyper(1.0, ge(0.0)),
    "proj_type": Hyper("std", one_of(*PROJ_TYPES)),
    "norm_growth_limit": Hyper(1.01, LIMIT),
    "seed": Hyper(0, integer(0)),
    "use_apollo": Hyper(True, FLAG),
}


def apollo_recipe(group: Mapping[str, Any], channelwise: bool) -> Chain:
    adamw = adamw_chain(group)
    if not group["use_apollo"]:
        return adamw
    b1, b2 = group["betas"]
    limit = group["norm_growth_limit"]
    matrices = chain(
        ApolloScaling(b1, b2, group["eps"], group["rank"], group["update_proj_gap"], group["proj_type"],
                      group["seed"], channelwise),
        *([NormGrowthLimiter(limit)] if limit is not None else []),
        DecoupledWeightDecay(group["weight_decay"], group["lr"]),
        ApplyLR(group["lr"] * group["scale"]),
    )
    return chain(RouteByNdim(matrices, adamw))


@register
class Apollo(DistOptimizer):
    __doc__ = __doc__
    name = "apollo"
    family = "memory_efficient"
    reference = ("naive per-tensor loop of APOLLO (paper Alg. 1 + norm-growth limiter); apollo-torch 1.0.3 "
                 "APOLLOAdamW with the same projections (eps=0, wd=0, no limiter)")
    hyper = APOLLO_HYPER

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return apollo_recipe(group, channelwise=True)


@register
class ApolloMini(DistOptimizer):
    __doc__ = __doc__
    name = "apollo_mini"
    family = "memory_efficient"
    reference = Apollo.reference.replace("APOLLO ", "APOLLO-Mini ", 1)
    hyper = {**APOLLO_HYPER, "rank": Hyper(1, integer(1)), "scale": Hyper(math.sqrt(128.0), ge(0.0))}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return apollo_recipe(group, channelwise=False)
