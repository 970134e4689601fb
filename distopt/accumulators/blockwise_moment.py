"""Φ operator: Adam-mini's block-wise second moment, one scalar EMA of mean(g²) per block.

    v_b <- β2 v_b + (1 - β2) · mean_{i ∈ b}(g_i²)        (one scalar per block b)

Partition rule (``block``):

- ``"row"`` (default): a tensor with ``ndim >= 2`` has one block per output row, i.e. per slice
  ``p[r]`` along dim 0 (for a ``Linear`` weight, one block per output neuron; for a conv
  weight, one per output channel), so ``v`` has shape ``(p.shape[0],)``;
- ``"tensor"``: the whole tensor is one block, ``v`` has shape ``()``;
- tensors with ``ndim <= 1`` (biases, norm scales, scalars) are always one block, ``v`` of
  shape ``()``.

Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", arXiv:2406.16793 (2024),
Algorithm 1. The paper's Hessian-based partition (Q/K by head, embeddings per token) is a
refinement of the per-output-neuron rule used here. The buffer is kept under ``vmean``
(it is not torch's full-size ``exp_avg_sq``). Returns the update unchanged.
Locality: TENSOR (the means are reductions over whole rows / the whole tensor).
"""
from __future__ import annotations

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext


def block_shape(param: Tensor, block: str) -> tuple[int, ...]:
    """Shape of the per-block second moment of ``param`` under the partition ``block``."""
    return (param.shape[0],) if block == "row" and param.dim() >= 2 else ()


def block_view(v: Tensor, param: Tensor) -> Tensor:
    """``v`` reshaped to broadcast against ``param`` (``(rows, 1, ..., 1)`` or 0-dim)."""
    return v.view(v.shape[0], *([1] * (param.dim() - 1))) if v.dim() else v


class BlockwiseSecondMoment(Operator):
    """EMA of the block means of ``u²``, ``v_b <- β2 v_b + (1 - β2) mean_b(u²)``; returns ``u``."""

    stage = Stage.PHI
    locality = Locality.TENSOR

    def __init__(self, beta: float, block: str = "row", key: str = "vmean") -> None:
        if block not in ("row", "tensor"):
            raise ValueError(f"BlockwiseSecondMoment: block must be 'row' or 'tensor', got {block!r}")
        self.beta, self.block, self.key = beta, block, key

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {self.key: torch.zeros(block_shape(param, self.block), dtype=param.dtype, device=param.device)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        means = []
        for u, state in zip(updates, ctx.states):
            dims = tuple(range(1, u.dim())) if state[self.key].dim() else tuple(range(u.dim()))
            means.append((u * u).mean(dim=dims) if dims else u * u)
        v = [s[self.key] for s in ctx.states]
        ctx.ops.mul_(v, self.beta)
        ctx.ops.add_(v, means, alpha=1.0 - self.beta)
        return updates
