"""Φ operator: normalise the gradient by the root of its (bias-corrected) second moment
*before* momentum, as LaProp does (Ziyin, Wang & Ueda, "LaProp: Separating Momentum and
Adaptivity in Adam", 2020, Algorithm 1).

    u <- g / (sqrt(v / (1 - β2^t)) + ε)

with ``v`` written by :class:`~distopt.accumulators.SecondMoment`. The same arithmetic as
:class:`~distopt.preconditioners.RootMomentPreconditioner` with ``β1 = 0``, at stage Φ so a
momentum can follow.
"""
from __future__ import annotations

from distopt.core.operator import Stage
from distopt.preconditioners.diagonal import RootMomentPreconditioner


class RootMomentNormalize(RootMomentPreconditioner):
    """``g / (sqrt(v̂) + ε)`` at stage Φ (a new list)."""

    stage = Stage.PHI

    def __init__(self, eps: float, beta2: float, key: str = "exp_avg_sq", bias_correct: bool = True) -> None:
        super().__init__(eps, 0.0, beta2, key=key, bias_correct=bias_correct)
