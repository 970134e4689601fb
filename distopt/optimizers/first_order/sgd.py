"""SGD with momentum, dampening, Nesterov and coupled weight decay (torch.optim.SGD).

    g <- g + wd·p;  b <- μ b + (1 - τ) g;  u = g + μ b (Nesterov) or b;  p <- p - lr·u
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import HeavyBall
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, WEIGHT_DECAY, ge, interval
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay


@register
class SGD(DistOptimizer):
    name = "sgd"
    family = "first_order"
    reference = "torch.optim.SGD"
    hyper = {
        "lr": Hyper(1e-3, ge(0.0)),
        "momentum": Hyper(0.0, interval(0.0, 1.0)),
        "dampening": Hyper(0.0, interval(0.0, 1.0, closed_high=True)),
        "nesterov": Hyper(False, FLAG),
        "weight_decay": WEIGHT_DECAY,
    }

    def __init__(self, params: Any, **hparams: Any) -> None:
        super().__init__(params, **hparams)
        for group in self.param_groups:
            if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
                raise ValueError("sgd: nesterov=True requires momentum > 0 and dampening = 0")

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            AddWeightDecay(group["weight_decay"]),
            HeavyBall(group["momentum"], group["dampening"], group["nesterov"]),
            ApplyLR(group["lr"]),
        )
