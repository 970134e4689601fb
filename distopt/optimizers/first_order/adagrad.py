"""Adagrad (Duchi, Hazan & Singer, JMLR 2011), as torch.optim.Adagrad.

    g <- g + wd·p;   G <- G + g²  (G_0 = initial_accumulator_value)
    p <- p - lr / (1 + (t-1)·lr_decay) · g / (sqrt(G) + ε)
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.accumulator import SumOfSquares
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import WEIGHT_DECAY, ge
from distopt.preconditioners import RootMomentPreconditioner
from distopt.preconditioners.lr_decay import ApplyDecayedLR
from distopt.scenarios import AddWeightDecay


@register
class Adagrad(DistOptimizer):
    name = "adagrad"
    family = "first_order"
    reference = "torch.optim.Adagrad"
    hyper = {
        "lr": Hyper(1e-2, ge(0.0)),
        "lr_decay": Hyper(0.0, ge(0.0)),
        "weight_decay": WEIGHT_DECAY,
        "initial_accumulator_value": Hyper(0.0, ge(0.0)),
        "eps": Hyper(1e-10, ge(0.0)),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            AddWeightDecay(group["weight_decay"]),
            SumOfSquares(group["initial_accumulator_value"], key="sum"),
            RootMomentPreconditioner(group["eps"], key="sum", bias_correct=False),
            ApplyDecayedLR(group["lr"], group["lr_decay"]),
        )
