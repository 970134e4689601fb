"""Layer-wise trust ratios (one scalar per tensor, so ``TENSOR`` locality).

``LARSTrustRatio`` (You, Gitman & Ginsburg, "Large Batch Training of Convolutional Networks",
2017, Algorithm 1), applied to the gradient before momentum (stage T):

    u <- η ||p|| / (||g|| + wd ||p||) · (g + wd p)

``LAMBTrustRatio`` (You et al., "Large Batch Optimization for Deep Learning: Training BERT in
76 minutes", ICLR 2020, Algorithm 2), applied to the Adam direction r (stage P):

    u = r + wd p;   u <- ||p|| / ||u|| · u

In both, the ratio is 1 where a norm (or the LARS denominator) is zero, as in the reference
implementations (a zero-initialised layer still moves). With ``adapt_vectors=False`` tensors
with ``ndim <= 1`` (biases, norm scales) get neither the ratio nor the decay, the common practice
of pytorch_optimizer.LARS and of the BERT LAMB code (``exclude_from_layer_adaptation``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


def _decayed(updates: list[Tensor], ctx: StepContext, weight_decay: float, adapted: list[int]) -> list[Tensor]:
    """A new list ``u + wd p`` on the adapted tensors, ``u`` on the others."""
    out = ctx.ops.mul(updates, 1.0)
    if weight_decay and adapted:
        ctx.ops.add_([out[i] for i in adapted], [ctx.params[i] for i in adapted], alpha=weight_decay)
    return out


def _adapted(params: list[Tensor], adapt_vectors: bool) -> list[int]:
    return [i for i, p in enumerate(params) if adapt_vectors or p.dim() > 1]


def _safe_ratio(num: Tensor, den: Tensor, scale: float = 1.0) -> Tensor:
    """``scale * num / den`` where both are positive, else 1 (0-dim tensors, no host sync)."""
    ok = (num > 0) & (den > 0)
    return torch.where(ok, scale * num / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(num))


class LARSTrustRatio(Operator):
    """LARS local learning rate ``η ||p|| / (||g|| + wd ||p||)`` times ``g + wd p`` (a new list)."""

    stage = Stage.T
    locality = Locality.TENSOR

    def __init__(self, trust_coefficient: float, weight_decay: float = 0.0, adapt_vectors: bool = True) -> None:
        self.trust_coefficient, self.weight_decay, self.adapt_vectors = trust_coefficient, weight_decay, adapt_vectors

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        adapted = _adapted(ctx.params, self.adapt_vectors)
        p_norms = ctx.ops.norm([ctx.params[i] for i in adapted])
        g_norms = ctx.ops.norm([updates[i] for i in adapted])
        out = _decayed(updates, ctx, self.weight_decay, adapted)
        ratios = [
            _safe_ratio(pn, gn + self.weight_decay * pn, self.trust_coefficient) for pn, gn in zip(p_norms, g_norms)
        ]
        ctx.ops.mul_([out[i] for i in adapted], ratios)
        return out


class LAMBTrustRatio(Operator):
    """LAMB: add ``wd p`` to the update, then scale it by ``||p|| / ||u||`` (a new list)."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(self, weight_decay: float = 0.0, adapt_vectors: bool = True) -> None:
        self.weight_decay, self.adapt_vectors = weight_decay, adapt_vectors

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        adapted = _adapted(ctx.params, self.adapt_vectors)
        out = _decayed(updates, ctx, self.weight_decay, adapted)
        p_norms = ctx.ops.norm([ctx.params[i] for i in adapted])
        u_norms = ctx.ops.norm([out[i] for i in adapted])
        ctx.ops.mul_([out[i] for i in adapted], [_safe_ratio(pn, un) for pn, un in zip(p_norms, u_norms)])
        return out
