"""Optimizer-state accounting: the exact bytes an optimizer keeps, from its state tensors."""
from __future__ import annotations

from typing import Any, Iterator

import torch


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def state_bytes(optimizer: torch.optim.Optimizer, include_step: bool = False) -> int:
    """Bytes held by the tensors in ``optimizer.state`` (each storage counted once).

    The scalar ``step`` counters are left out unless ``include_step``: they are bookkeeping, 4
    bytes per parameter *tensor*, not per parameter. Works for any ``torch.optim.Optimizer``.
    Under a sharding wrapper this is the calling rank's share.
    """
    seen: dict[tuple[int, int], int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key == "step" and not include_step:
                continue
            for t in _tensors(value):
                if t.device.type == "meta":
                    continue
                storage = t.untyped_storage()
                seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    return sum(seen.values())


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """:func:`state_bytes` divided by the number of parameters the optimizer holds."""
    n = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    return state_bytes(optimizer) / max(n, 1)
