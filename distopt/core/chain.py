"""``chain``: a recipe as an ordered tuple of operators, checked against E -> T -> Phi -> P.

Stages must not go backwards: a gradient estimate (E) is transformed by scenario
operators (T: clipping, noise, projection), accumulated (Phi: momentum, moments) and then
preconditioned and applied (P). Several operators of one stage may follow each other.
"""
from __future__ import annotations

from typing import Iterator

from torch import Tensor

from distopt.core.operator import Locality, Operator, StepContext


class Chain:
    """An ordered, stage-checked sequence of operators; itself usable as one operator."""

    def __init__(self, *operators: Operator) -> None:
        flat: list[Operator] = []
        for op in operators:
            flat.extend(op.operators if isinstance(op, Chain) else [op])
        for op in flat:
            if not isinstance(op, Operator):
                raise TypeError(f"chain: expected Operator instances, got {type(op).__name__}")
        for before, after in zip(flat, flat[1:]):
            if after.stage < before.stage:
                raise ValueError(
                    f"chain: {type(after).__name__} (stage {after.stage.symbol}) cannot follow "
                    f"{type(before).__name__} (stage {before.stage.symbol}); stages run E -> T -> Φ -> P"
                )
        self.operators: tuple[Operator, ...] = tuple(flat)

    @property
    def locality(self) -> Locality:
        """The widest locality of any operator: what the whole recipe needs to see."""
        return max((op.locality for op in self.operators), default=Locality.ELEMENTWISE)

    @property
    def stages(self) -> str:
        return "".join(dict.fromkeys(op.stage.symbol for op in self.operators))

    def init(self, param: Tensor) -> dict:
        state: dict = {}
        for op in self.operators:
            buffers = op.init(param)
            clash = set(buffers) & set(state)
            if clash:
                raise ValueError(f"chain: state key {sorted(clash)[0]!r} is used by two operators")
            state.update(buffers)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        for op in self.operators:
            updates = op.update(updates, ctx)
        return updates

    def __iter__(self) -> Iterator[Operator]:
        return iter(self.operators)

    def __len__(self) -> int:
        return len(self.operators)

    def __repr__(self) -> str:
        return "chain(" + ", ".join(repr(op) for op in self.operators) + ")"


def chain(*operators: Operator) -> Chain:
    """Compose operators into a recipe, checking the E -> T -> Phi -> P order."""
    return Chain(*operators)
