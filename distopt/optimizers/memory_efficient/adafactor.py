"""Adafactor (Shazeer & Stern, ICML 2018), exactly as torch.optim.Adafactor.

Per parameter, at step t (τ = ``beta2_decay``, (ε1, ε2) = ``eps``, ε1 = None -> dtype's machine eps):

    α_t = max(ε2, RMS(p_{t-1})) · min(lr, 1/sqrt(t))          relative step (RMS of p *before* decay)
    p   <- p (1 - lr·wd)                                       decoupled weight decay, scaled by lr (not α_t)
    ndim >= 2:  R <- lerp(R, mean_{last}(g²), t^τ),  C <- lerp(C, mean_{-2}(g²), t^τ)
                V̂ = R C / max(mean_{-2}(R), ε1)               (rank-1 factored second moment)
    ndim <= 1:  V <- lerp(V, g², t^τ),  V̂ = V
    u   = g / sqrt(max(V̂, ε1²))
    p   <- p - α_t · u / max(1, RMS(u) / d)

torch's conventions, which this follows (and which differ from the paper's Algorithm 4): no
first moment (β1 = 0); ``lr`` replaces the paper's constant 10⁻² in ρ_t = min(lr, 1/sqrt t),
so ``lr`` is an upper bound of the relative step, not a step size; ε1 clamps the row mean and
the estimate instead of being added to g²; row/column factors are means, not sums; weight
decay is decoupled and multiplied by ``lr``; ``maximize`` negates the gradient.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.factored import FactoredSecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import WEIGHT_DECAY, Rule, ge
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.factored import FactoredRootPreconditioner
from distopt.preconditioners.relative_step import ClipUpdateRMS, RelativeStepSize


def _nonneg(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and 0.0 <= x < float("inf")


EPS_PAIR = Rule(
    lambda e: isinstance(e, (tuple, list)) and len(e) == 2 and (e[0] is None or _nonneg(e[0])) and _nonneg(e[1]),
    "a pair (eps1, eps2) with eps1 None or >= 0 and eps2 >= 0",
)
NON_POSITIVE = Rule(lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and -float("inf") < x <= 0.0,
                    "<= 0.0")


@register
class Adafactor(DistOptimizer):
    name = "adafactor"
    family = "memory_efficient"
    reference = "torch.optim.Adafactor"
    hyper = {
        "lr": Hyper(1e-2, ge(0.0)),
        "beta2_decay": Hyper(-0.8, NON_POSITIVE),
        "eps": Hyper((None, 1e-3), EPS_PAIR),
        "d": Hyper(1.0, ge(1.0)),
        "weight_decay": WEIGHT_DECAY,
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        eps1, eps2 = group["eps"]
        return chain(
            FactoredSecondMoment(group["beta2_decay"]),
            FactoredRootPreconditioner(eps1),
            ClipUpdateRMS(group["d"]),
            RelativeStepSize(group["lr"], eps2),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(1.0),
        )
