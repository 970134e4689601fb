"""T operators that add a regularizer's gradient (coupled, L2-style weight decay)."""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class AddWeightDecay(Operator):
    """Coupled (L2) weight decay: ``u <- u + wd * p`` (torch.optim's ``weight_decay`` of SGD/Adam)."""

    stage = Stage.T

    def __init__(self, weight_decay: float) -> None:
        self.weight_decay = weight_decay

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.weight_decay == 0:
            return updates
        return ctx.ops.add(updates, ctx.params, alpha=self.weight_decay)
