"""Schedule-Free SGD (Defazio et al., "The Road Less Scheduled", NeurIPS 2024), as
``schedulefree.SGDScheduleFreeReference``; coupled weight decay taken at ``y``. Parameters
hold ``y`` in training; ``optimizer.eval()`` / ``optimizer.train()`` swap in ``x`` / ``y``.

    g <- g + wd·y;   z <- z - lr_t g;   x <- (1-c_t) x + c_t z;   y = μ x + (1-μ) z
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.averaging import ScheduleFreeAverage
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import Rule, ge
from distopt.optimizers.first_order.schedule_free_adamw import SCHEDULE_FREE_HYPER, ScheduleFreeMode
from distopt.scenarios.regularization import AddWeightDecay

OPEN_UNIT = Rule(lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 < x < 1.0, "in (0, 1)")


@register
class ScheduleFreeSGD(ScheduleFreeMode, DistOptimizer):
    name = "schedule_free_sgd"
    family = "first_order"
    reference = "schedulefree.SGDScheduleFreeReference"
    hyper = {"lr": Hyper(1.0, ge(0.0)), "momentum": Hyper(0.9, OPEN_UNIT), **SCHEDULE_FREE_HYPER}

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        return group["momentum"]

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            AddWeightDecay(group["weight_decay"]),
            ScheduleFreeAverage(
                group["lr"], group["momentum"], 0.0, False, group["warmup_steps"], group["r"], group["weight_lr_power"],
            ),
        )
