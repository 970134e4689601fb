"""Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024), as
torch.optim.Muon, with an AdamW fallback for the parameters that are not matrices.

Matrices (ndim >= 2; conv weights viewed as (out, -1)), in a group with ``use_muon=True``:

    B <- μ B + (1 - μ) g;   u = g + μ (B - g) if nesterov else B
    O = NS^(a,b,c)_k(u; ε)                    (quintic Newton–Schulz, run in ``ns_dtype``)
    p <- p (1 - lr·wd);   p <- p - lr·s(m, n)·O   (s from ``adjust_lr_fn``, see orthogonal.py)

Everything else, i.e. tensors with ndim < 2 (biases, norm gains, scalars) and every parameter
of a group with ``use_muon=False`` (pass embeddings and output heads that way), runs AdamW
(torch.optim.AdamW's math) with its own ``adamw_lr`` (None: the group's ``lr``),
``adamw_betas``, ``adamw_eps`` and ``adamw_weight_decay``.

``ns_dtype`` is the Newton–Schulz compute dtype: ``torch.bfloat16`` (default) is exactly what
torch.optim.Muon does; ``None`` runs it in the update's own dtype (float64 for exact checks).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from distopt.accumulators.moments import FirstMoment, SecondMoment
from distopt.accumulators.muon_momentum import MuonMomentum
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, WEIGHT_DECAY, Rule, _real, betas, interval, one_of
from distopt.core.operator import Operator, Stage, StepContext
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.preconditioners.orthogonal import (
    NS_COEFFICIENTS, NS_EPS, ApplyShapeScaledLR, NewtonSchulzOrthogonalize,
)


class RouteByNdim(Operator):
    """Run ``matrices`` on the entries with ndim >= 2 and ``others`` on the rest, each on its
    own slice of the step context. Ends in the parameter update, hence stage P."""

    stage = Stage.P

    def __init__(self, matrices: Chain, others: Chain) -> None:
        self.matrices, self.others = matrices, others
        self.locality = max(matrices.locality, others.locality)  # type: ignore[misc]

    def _branch(self, param: Tensor) -> Chain:
        return self.matrices if param.ndim >= 2 else self.others

    def init(self, param: Tensor) -> dict[str, Any]:
        return self._branch(param).init(param)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        out = list(updates)
        for branch in (self.matrices, self.others):
            idx = [i for i, p in enumerate(ctx.params) if self._branch(p) is branch]
            if idx:
                sub = StepContext(ctx.group, [ctx.params[i] for i in idx], [ctx.states[i] for i in idx],
                                  [ctx.steps[i] for i in idx], ctx.ops)
                for i, u in zip(idx, branch.update([updates[i] for i in idx], sub)):
                    out[i] = u
        return out


def _coefficients(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3 and all(_real(v) for v in x)


@register
class Muon(DistOptimizer):
    __doc__ = __doc__
    name = "muon"
    family = "second_order"
    reference = "torch.optim.Muon (matrices; NS in float64 and bfloat16), torch.optim.AdamW (ndim < 2)"
    hyper = {
        "lr": LR,
        "weight_decay": Hyper(0.1, WEIGHT_DECAY.rule),
        "momentum": Hyper(0.95, interval(0.0, 1.0, closed_high=True)),
        "nesterov": Hyper(True, FLAG),
        "ns_coefficients": Hyper(NS_COEFFICIENTS, Rule(_coefficients, "a tuple of 3 finite floats")),
        "eps": Hyper(NS_EPS, EPS.rule),
        "ns_steps": Hyper(5, Rule(lambda x: isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 100,
                                  "an integer in [0, 100)")),
        "adjust_lr_fn": Hyper(None, one_of(None, "original", "match_rms_adamw")),
        "ns_dtype": Hyper(torch.bfloat16, one_of(None, torch.bfloat16, torch.float16, torch.float32, torch.float64)),
        "use_muon": Hyper(True, FLAG),
        "adamw_lr": Hyper(None, Rule(lambda x: x is None or (_real(x) and x >= 0), "None or >= 0.0")),
        "adamw_betas": Hyper((0.9, 0.95), betas(2)),
        "adamw_eps": Hyper(1e-10, EPS.rule),
        "adamw_weight_decay": Hyper(0.0, WEIGHT_DECAY.rule),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        lr = group["lr"] if group["adamw_lr"] is None else group["adamw_lr"]
        b1, b2 = group["adamw_betas"]
        adamw = chain(
            SecondMoment(b2), FirstMoment(b1), RootMomentPreconditioner(group["adamw_eps"], b1, b2),
            DecoupledWeightDecay(group["adamw_weight_decay"], lr), ApplyLR(lr),
        )
        if not group["use_muon"]:
            return adamw
        muon = chain(
            MuonMomentum(group["momentum"], group["nesterov"]),
            NewtonSchulzOrthogonalize(group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"]),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyShapeScaledLR(group["lr"], group["adjust_lr_fn"]),
        )
        return chain(RouteByNdim(muon, adamw))
