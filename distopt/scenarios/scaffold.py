"""T operator of SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020, Algorithm 1 line 10): the client's gradient is corrected by the
control variates before any accumulation or preconditioning,

    g <- g - c_i + c

with ``c_i`` the client's control variate and ``c`` the server's. The federated client computes
``c - c_i`` once per round (the control variates live in the client's Flower ``Context.state``
and in the server strategy, not in the optimizer: they change only between rounds), and hands
the operator a mapping ``param -> (c - c_i)``. The new ``c_i`` (option II of the paper) is
computed by the client after its local steps, see
:func:`distopt.integrations.flower.client.scaffold_control_update`.
"""
from __future__ import annotations

from typing import Mapping

from torch import Tensor

from distopt.core.operator import Operator, Stage, StepContext


class ScaffoldCorrection(Operator):
    """``u <- u + (c - c_i)``: a new list; the incoming updates (``p.grad``) are left untouched.

    ``correction`` maps each parameter tensor (by identity) to ``c - c_i`` of the same shape;
    parameters missing from the mapping pass through unchanged.
    """

    stage = Stage.T

    def __init__(self, correction: Mapping[Tensor, Tensor]) -> None:
        self.correction = correction

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if not self.correction:
            return updates
        deltas = [self.correction.get(p) for p in ctx.params]
        if all(d is not None for d in deltas):
            return ctx.ops.add(updates, deltas)
        return [u if d is None else u + d for u, d in zip(updates, deltas)]

    def __repr__(self) -> str:
        return f"ScaffoldCorrection({len(self.correction)} tensors)"
