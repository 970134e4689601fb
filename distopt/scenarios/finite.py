"""T operator: refuse non-finite gradients before they reach any statistic.

Second-order statistics (Kronecker factors, eigenbases) never recover from one NaN or inf: every
later root would be NaN. ``RequireFinite`` checks all the group's updates with one fused norm and
one host synchronisation per step and raises ``FloatingPointError`` naming the shape of the first
offending parameter, so the parameters are never written with NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class RequireFinite(Operator):
    """Raise ``FloatingPointError`` if any update holds NaN or ±inf; returns the updates unchanged.

    Locality stays ELEMENTWISE: a check on any slice raises exactly when the whole check would."""

    stage = Stage.T

    def __init__(self, name: str = "optimizer") -> None:
        self.name = name

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if not updates:
            return updates
        norms = ctx.ops.norm(updates)
        if bool(torch.isfinite(torch.stack([n.float() for n in norms]).sum()).item()):
            return updates
        for u, p in zip(updates, ctx.params):
            if not bool(torch.isfinite(u).all().item()):
                raise FloatingPointError(
                    f"{self.name}: non-finite gradient (NaN or inf) for a parameter of shape {tuple(p.shape)}; "
                    "the step was not taken")
        return updates  # only the norm overflowed: the entries themselves are finite
