"""P operators that average iterates: Lookahead's slow weights and Schedule-Free's x/z sequences.

``LookaheadAverage`` (Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back",
NeurIPS 2019, Algorithm 1): after the inner optimizer's step, every ``k``-th step

    slow <- slow + α (fast - slow);   fast <- slow          (``slow_params`` starts at p_0)

``ScheduleFreeAverage`` (Defazio et al., "The Road Less Scheduled", NeurIPS 2024, Eq. 1-3 and
the warmup / polynomial weighting of the reference code). Parameters hold ``y``:

    lr_t = lr · min(1, t / warmup);  lr_max = max_t lr_t;  w_t = t^r · lr_max^power
    c_t = w_t / Σ_{s<=t} w_s
    z <- z - lr_t·wd·(z or y) - lr_t·u;   x <- (1 - c_t) x + c_t z;   y = β x + (1 - β) z
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class LookaheadAverage(Operator):
    """Every ``k`` steps pull the fast weights (the params) ``α`` of the way from the slow ones."""

    stage = Stage.P

    def __init__(self, k: int, alpha: float) -> None:
        self.k, self.alpha = k, alpha

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"slow_params": param.detach().clone()}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        due = [i for i, t in enumerate(ctx.steps) if t % self.k == 0]
        if due:
            fast = [ctx.params[i] for i in due]
            slow = [ctx.states[i]["slow_params"] for i in due]
            ctx.ops.lerp_(fast, slow, 1.0 - self.alpha)  # fast = slow + α (fast - slow)
            ctx.ops.copy_(slow, fast)
        return updates


def schedule_free_y(x: Tensor, z: Tensor, beta: float) -> Tensor:
    """The gradient-evaluation point ``y = β x + (1 - β) z`` (the same arithmetic everywhere)."""
    return x.mul(beta).add_(z, alpha=1.0 - beta)


class ScheduleFreeAverage(Operator):
    """Schedule-Free step on ``z``, online average ``x`` and interpolation ``y`` (written to p).

    State: ``z``, ``x`` (both start at p_0) and the python numbers ``sf_weight_sum``, ``sf_lr_max``.
    """

    stage = Stage.P

    def __init__(
        self, lr: float, beta: float, weight_decay: float = 0.0, decay_at_z: bool = False,
        warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0,
    ) -> None:
        self.lr, self.beta, self.weight_decay, self.decay_at_z = lr, beta, weight_decay, decay_at_z
        self.warmup_steps, self.r, self.weight_lr_power = warmup_steps, r, weight_lr_power

    def init(self, param: Tensor) -> dict[str, Any]:
        return {"z": param.detach().clone(), "x": param.detach().clone(), "sf_weight_sum": 0.0, "sf_lr_max": -1.0}

    def _coefficients(self, t: int, state: dict[str, Any]) -> tuple[float, float]:
        lr = self.lr * (t / self.warmup_steps if t <= self.warmup_steps else 1.0)
        state["sf_lr_max"] = lr_max = max(lr, state["sf_lr_max"])
        weight = (t**self.r) * (lr_max**self.weight_lr_power)
        state["sf_weight_sum"] = weight_sum = state["sf_weight_sum"] + weight
        return lr, (weight / weight_sum if weight_sum != 0 else 0.0)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        lrs, cs = zip(*(self._coefficients(t, s) for t, s in zip(ctx.steps, ctx.states)))
        z = [s["z"] for s in ctx.states]
        x = [s["x"] for s in ctx.states]
        if self.weight_decay:
            ctx.ops.sub_(z, ctx.ops.mul(z if self.decay_at_z else ctx.params, [lr * self.weight_decay for lr in lrs]))
        ctx.ops.sub_(z, ctx.ops.mul(updates, list(lrs)))
        ctx.ops.lerp_(x, z, list(cs))
        for p, xi, zi in zip(ctx.params, x, z):
            p.copy_(schedule_free_y(xi, zi, self.beta))
        return updates
