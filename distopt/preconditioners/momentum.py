"""P operator: heavy-ball momentum on the *preconditioned* update (RMSprop with momentum).

    b_t = μ b_{t-1} + u_t   (b_0 = 0);   u <- b_t

RMSprop with momentum (Tieleman & Hinton, COURSERA Lecture 6.5, 2012; torch.optim.RMSprop)
accumulates the already preconditioned step ``g / (sqrt(v) + ε)``, so the momentum runs
after the preconditioner. The math is :class:`~distopt.accumulators.HeavyBall` with no
dampening (its first step ``b_1 = u_1`` equals ``μ·0 + u_1``); only the stage differs, so
that the chain's E -> T -> Φ -> P order check accepts it after a P operator.
"""
from __future__ import annotations

from distopt.accumulators.momentum import HeavyBall
from distopt.core.operator import Stage


class PreconditionedHeavyBall(HeavyBall):
    """:class:`HeavyBall` (key ``momentum_buffer``) placed in stage P, after a preconditioner."""

    stage = Stage.P

    def __init__(self, momentum: float) -> None:
        super().__init__(momentum, dampening=0.0, nesterov=False)
