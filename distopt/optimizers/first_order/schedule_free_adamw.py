"""Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024), as
``schedulefree.AdamWScheduleFreeReference``. Parameters hold ``y`` during training; the state
keeps ``z`` and the average ``x``. Call ``optimizer.eval()`` before evaluating or saving
(parameters become ``x``) and ``optimizer.train()`` before training again (back to ``y``).

    v <- β2 v + (1-β2) g²;   u = g / (sqrt(v/(1-β2^t)) + ε)
    z <- z - lr_t·wd·y - lr_t·u;   x <- (1-c_t) x + c_t z;   y = β1 x + (1-β1) z
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from distopt.accumulators.averaging import ScheduleFreeAverage, schedule_free_y
from distopt.accumulators.moments import SecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, WEIGHT_DECAY, betas, ge, integer
from distopt.preconditioners.diagonal import RootMomentPreconditioner

SCHEDULE_FREE_HYPER = {
    "weight_decay": WEIGHT_DECAY,
    "warmup_steps": Hyper(0, integer(0)),
    "r": Hyper(0.0, ge(0.0)),
    "weight_lr_power": Hyper(2.0, ge(0.0)),
}


class ScheduleFreeMode:
    """``train()`` / ``eval()`` for Schedule-Free recipes: swap the parameters between the
    training point ``y`` and the averaged ``x``, exactly like the ``schedulefree`` package.
    The mode is kept per param group under ``train_mode`` so it survives ``state_dict()``."""

    param_groups: list[dict[str, Any]]
    state: Any

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        self.param_groups[-1].setdefault("train_mode", True)

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters <- x (the point to evaluate and checkpoint)."""
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "x" in self.state[p]:
                        p.copy_(self.state[p]["x"])
                group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Parameters <- y = β x + (1 - β) z (the point where gradients are taken)."""
        for group in self.param_groups:
            if not group["train_mode"]:
                beta = self.interpolation(group)
                for p in group["params"]:
                    state = self.state[p]
                    if "x" in state:
                        p.copy_(schedule_free_y(state["x"], state["z"], beta))
                group["train_mode"] = True

    def step(self, closure: Any = None) -> Any:
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError(
                f"{type(self).__name__}: step() called in eval mode; call optimizer.train() first "
                "(after eval() the parameters hold the average x, not the training point y)"
            )
        return super().step(closure)  # type: ignore[misc]


@register
class ScheduleFreeAdamW(ScheduleFreeMode, DistOptimizer):
    name = "schedule_free_adamw"
    family = "first_order"
    reference = "schedulefree.AdamWScheduleFreeReference"
    hyper = {
        "lr": Hyper(0.0025, ge(0.0)),
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        **SCHEDULE_FREE_HYPER,
        "decay_at_z": Hyper(False, FLAG),
    }

    @staticmethod
    def interpolation(group: Mapping[str, Any]) -> float:
        return group["betas"][0]

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            SecondMoment(b2),
            RootMomentPreconditioner(group["eps"], 0.0, b2),
            ScheduleFreeAverage(
                group["lr"], b1, group["weight_decay"], group["decay_at_z"],
                group["warmup_steps"], group["r"], group["weight_lr_power"],
            ),
        )
