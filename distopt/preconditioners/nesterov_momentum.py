"""P operator: SGD momentum (optionally Nesterov) on the *preconditioned* direction.

    b_t = μ b_{t-1} + u_t  (b_1 = u_1);   u <- u + μ b_t (Nesterov) or u <- b_t

Distributed Shampoo's ``momentum`` / ``use_nesterov`` (applied after preconditioning and grafting);
the math is :class:`~distopt.accumulators.HeavyBall` without dampening (torch.optim.SGD's), placed in
stage P so that it may follow a preconditioner in a chain.
"""
from __future__ import annotations

from distopt.accumulators.momentum import HeavyBall
from distopt.core.operator import Stage


class PreconditionedMomentum(HeavyBall):
    """:class:`HeavyBall` (key ``momentum_buffer``, no dampening) in stage P, with Nesterov."""

    stage = Stage.P

    def __init__(self, momentum: float, nesterov: bool = False) -> None:
        super().__init__(momentum, dampening=0.0, nesterov=nesterov)
