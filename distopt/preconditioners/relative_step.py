"""P operators of Adafactor: update clipping and the relative (parameter-scaled) step size.

``ClipUpdateRMS``:    u <- u / max(1, RMS(u) / d)
``RelativeStepSize``: u <- max(ε2, RMS(p_{t-1})) · min(lr, 1/sqrt(t)) · u

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
Section 6 (update clipping, threshold d) and Section 8 (relative step size; the paper's
ρ_t = min(10⁻², 1/sqrt t) with ``lr`` in place of 10⁻², as torch.optim.Adafactor).
``RelativeStepSize`` reads RMS(p) before any later operator changes ``p`` (place it before
:class:`~distopt.preconditioners.DecoupledWeightDecay`); follow it with ``ApplyLR(1.0)``.
Both reduce over whole tensors: locality TENSOR.
"""
from __future__ import annotations

from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


def _rms(xs: list[Tensor], ctx: StepContext) -> list[float]:
    return [n.item() / max(x.numel(), 1) ** 0.5 for n, x in zip(ctx.ops.norm(xs), xs)]


class ClipUpdateRMS(Operator):
    """Scale the update down so that its root mean square is at most ``d``."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, d: float = 1.0) -> None:
        self.d = d

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        return ctx.ops.mul(updates, [1.0 / max(1.0, r / self.d) for r in _rms(updates, ctx)])


class RelativeStepSize(Operator):
    """Multiply the update by ``max(ε2, RMS(p)) · min(lr, t^{-1/2})``."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, lr: float | None = None, eps2: float = 1e-3) -> None:
        self.lr, self.eps2 = lr, eps2

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        lr = ctx.group["lr"] if self.lr is None else self.lr
        scales = [max(self.eps2, r) * min(lr, 1.0 / t**0.5) for r, t in zip(_rms(ctx.params, ctx), ctx.steps)]
        return ctx.ops.mul(updates, scales)
