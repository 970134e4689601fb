"""The operator protocol: one idea of an optimizer as a small, composable stage.

The survey writes every optimizer as E (gradient estimation) -> T (scenario transform)
-> Phi (accumulation) -> P (preconditioning / projection, ending in the parameter update).
An :class:`Operator` is one such step. It works on *lists* of tensors (one entry per
parameter of a param group that has an update this step) so that ``torch._foreach_*``
kernels apply, and it declares

- its ``stage`` (:class:`Stage`), checked by :func:`distopt.chain`;
- its ``locality`` (:class:`Locality`), which tells the sharding layer what slice of a
  tensor the operator can run on: ``ELEMENTWISE`` is exact on any slice, ``TENSOR``
  needs a reduction over the whole tensor, ``MATRIX`` needs the whole 2-D matrix.

Operators never modify the tensors they receive as ``updates`` unless they created them:
the first update list is ``p.grad`` itself, which belongs to the user.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from distopt.core.tensor_ops import TensorOps


class Stage(enum.IntEnum):
    """Position of an operator in the E -> T -> Phi -> P data path."""

    E = 0
    T = 1
    PHI = 2
    P = 3

    @property
    def symbol(self) -> str:
        return {0: "E", 1: "T", 2: "Φ", 3: "P"}[int(self)]


class Locality(enum.IntEnum):
    """How much of a tensor an operator must see to be exact (ordered: wider is larger)."""

    ELEMENTWISE = 0
    TENSOR = 1
    MATRIX = 2


@dataclass
class StepContext:
    """Everything an operator may read during one step of one param group.

    ``steps[i]`` is the 1-based step count of ``params[i]`` (already incremented);
    ``states[i]`` is ``optimizer.state[params[i]]`` and holds every operator's buffers.
    """

    group: dict[str, Any]
    params: list[Tensor]
    states: list[dict[str, Any]]
    steps: list[int]
    ops: TensorOps


class Operator:
    """Base class of every stage. Subclasses set ``stage`` and ``locality`` and override
    :meth:`init` (per-parameter buffers) and :meth:`update` (the transform)."""

    stage: ClassVar[Stage]
    locality: ClassVar[Locality] = Locality.ELEMENTWISE

    def init(self, param: Tensor) -> dict[str, Any]:
        """Buffers this operator keeps for ``param``; keys must be unique within a chain."""
        return {}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
