"""Shampoo's block layout: which matrix blocks of a parameter carry their own Kronecker factors.

Pure functions of the *global* shape (never of a local shard), so the same blocks, the future unit
of sharding, come out whatever the world size or backend.

The rule (:func:`block_layout`):

- ``ndim >= 2``: the matrix view ``(shape[0], prod(shape[1:]))`` (Muon's view of conv weights, see
  :func:`distopt.preconditioners.orthogonal.matrix_shape`), preconditioned on both sides.
- ``ndim <= 1`` (biases, gains, scalars): the column ``(numel, 1)``, preconditioned on the left
  only (full-matrix AdaGrad on the vector, Distributed Shampoo's rule for 1-D tensors) when
  ``precondition_1d``; otherwise ``None``: the vector is diagonal (see the Shampoo recipe).
- Each side of size ``d`` is split into ``ceil(d / max_dim)`` near-equal parts (the sizes of
  ``torch.tensor_split``: the first ``d % n`` parts are one longer). Distributed Shampoo cuts
  ``max_dim``-sized blocks and a remainder; near-equal parts give more same-shape blocks to batch
  (2304 rows with ``max_dim=1024``: three 768-row blocks rather than 1024 + 1024 + 256) and
  balance the per-block cost across ranks.
- Blocks are numbered row-major: block ``k`` is (row part ``k // len(cols)``, column part
  ``k % len(cols)``); its state keys end in ``_k``.
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def split_sizes(d: int, max_dim: int) -> tuple[int, ...]:
    """``d`` split into ``ceil(d / max_dim)`` near-equal sizes, longer ones first."""
    n = max(1, -(-d // max_dim))
    q, r = divmod(d, n)
    return (q + 1,) * r + (q,) * (n - r)


@dataclass(frozen=True)
class BlockLayout:
    """The (rows, cols) matrix view of a parameter and its grid of blocks."""

    view: tuple[int, int]
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    two_sided: bool  # False: left factor only (a preconditioned vector)

    @property
    def num_blocks(self) -> int:
        return len(self.rows) * len(self.cols)

    def block_shapes(self) -> list[tuple[int, int]]:
        return [(r, c) for r in self.rows for c in self.cols]


@functools.lru_cache(maxsize=4096)
def block_layout(shape: tuple[int, ...], max_dim: int, precondition_1d: bool) -> BlockLayout | None:
    """The layout of a parameter of global ``shape`` (``None``: a diagonal vector)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 2:
        m, n = shape[0], math.prod(shape[1:])
        return BlockLayout((m, n), split_sizes(m, max_dim), split_sizes(n, max_dim), True)
    if not precondition_1d:
        return None
    numel = math.prod(shape)
    return BlockLayout((numel, 1), split_sizes(numel, max_dim), (1,), False)


def block_slices(shape: tuple[int, ...], max_dim: int, precondition_1d: bool = True) -> list[tuple[slice, ...]]:
    """The blocks of a parameter of ``shape``, in block order: ``(row_slice, col_slice)`` into the
    matrix view for ``ndim >= 2``, ``(slice,)`` into the flattened vector otherwise."""
    lay = block_layout(tuple(shape), max_dim, precondition_1d)
    if lay is None:
        return []

    def slices(sizes: tuple[int, ...]) -> list[slice]:
        starts = [0, *itertools.accumulate(sizes)]
        return [slice(a, b) for a, b in zip(starts, starts[1:])]

    if not lay.two_sided:
        return [(s,) for s in slices(lay.rows)]
    return [(r, c) for r in slices(lay.rows) for c in slices(lay.cols)]


def to_blocks(x: Tensor, lay: BlockLayout) -> list[Tensor]:
    """Views of the blocks of ``x`` (any tensor with ``lay.view``'s number of elements)."""
    mat = x.reshape(lay.view)
    return [c for r in mat.split(lay.rows, 0) for c in r.split(lay.cols, 1)]


def from_blocks(blocks: list[Tensor], lay: BlockLayout) -> Tensor:
    """The (rows, cols) matrix assembled from its blocks (a new tensor)."""
    n = len(lay.cols)
    if len(blocks) == 1:
        return blocks[0]
    rows = [torch.cat(blocks[i:i + n], dim=1) if n > 1 else blocks[i] for i in range(0, len(blocks), n)]
    return torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kronecker factors, roots and eigenbases are kept in at least float32 (bfloat16 statistics
    lose the small eigenvalues), and in float64 for float64 parameters."""
    return torch.promote_types(dtype, torch.float32)
