"""GaLore-AdamW (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, Algorithm 2), with AdamW for the parameters that are not matrices.

Matrices (ndim >= 2, viewed as (shape[0], -1)) of a group with ``use_galore=True``; r = min(rank, m, n):

    every update_proj_gap steps (steps 1, 1+T, ...):  U, S, Vᵀ = SVD(G);  P = U[:, :r] (left) or Vᵀ[:r] (right)
    R = Pᵀ G  or  G Pᵀ                                     (side by ``proj_type``; "std": the smaller side)
    M <- β1 M + (1-β1) R;   V <- β2 V + (1-β2) R²;   N = (M / (1-β1^t)) / (sqrt(V / (1-β2^t)) + ε)
    p <- p (1 - lr·wd);     p <- p - lr · α · (P N  or  N P)          (α = ``scale``)

Everything else (ndim < 2, and every param of a group with ``use_galore=False``: pass
embeddings / heads that way if wanted) runs torch.optim.AdamW's math with the same lr, betas,
eps and weight_decay. State per matrix: ``projector`` (m·r or r·n) and ``exp_avg``,
``exp_avg_sq`` (r·n or m·r each), all in the param's dtype; the SVD runs in float32 (float64
for float64 params). The moments are kept across projector refreshes, as in the paper.

Differences from the authors' package galore-torch 1.0 (``GaLoreAdamW``), where this follows
the paper: ε is added after the bias correction (torch.optim.AdamW; the package adds it to
sqrt(V) and folds the corrections into the step size); weight decay is applied before the
step to the pre-step weights (the package decays the already-updated weights); the SVD of a
float64 gradient runs in float64 (the package always uses float32); default ε = 1e-8 (1e-6).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, betas, ge, integer, one_of
from distopt.optimizers.second_order.muon import RouteByNdim
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay, RootMomentPreconditioner
from distopt.scenarios.low_rank import (
    PROJ_TYPES, GaLoreProjection, LowRankFirstMoment, LowRankSecondMoment, ProjectBack,
)


def adamw_chain(group: Mapping[str, Any]) -> Chain:
    """torch.optim.AdamW's math on the group's lr, betas, eps and weight_decay."""
    b1, b2 = group["betas"]
    return chain(
        SecondMoment(b2), FirstMoment(b1), RootMomentPreconditioner(group["eps"], b1, b2),
        DecoupledWeightDecay(group["weight_decay"], group["lr"]), ApplyLR(group["lr"]),
    )


@register
class GaLore(DistOptimizer):
    __doc__ = __doc__
    name = "galore"
    family = "memory_efficient"
    reference = ("naive per-tensor loop of GaLore-AdamW (paper Alg. 2); galore-torch 1.0 GaLoreAdamW "
                 "(eps=0, wd=0, SVD in float64)")
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": Hyper(0.0, WEIGHT_DECAY.rule),
        "rank": Hyper(128, integer(1)),
        "update_proj_gap": Hyper(200, integer(1)),
        "scale": Hyper(0.25, ge(0.0)),
        "proj_type": Hyper("std", one_of(*PROJ_TYPES)),
        "use_galore": Hyper(True, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        adamw = adamw_chain(group)
        if not group["use_galore"]:
            return adamw
        b1, b2 = group["betas"]
        rank, proj_type = group["rank"], group["proj_type"]
        galore = chain(
            GaLoreProjection(rank, group["update_proj_gap"], proj_type),
            LowRankSecondMoment(b2, rank, proj_type),
            LowRankFirstMoment(b1, rank, proj_type),
            RootMomentPreconditioner(group["eps"], b1, b2),
            ProjectBack(proj_type),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(group["lr"] * group["scale"]),
        )
        return chain(RouteByNdim(galore, adamw))
