"""Exact live-tensor bytes on any device, for memory claims measured on CPU.

:class:`LiveBytes` is a ``TorchDispatchMode``: every storage produced by an aten op while it is
active is counted once, and uncounted when the storage is freed (a weak reference to the
``UntypedStorage`` Python object, which torch keeps alive exactly as long as the C++ storage).
Outputs that share storage with an input (views, in-place ops) add nothing.
``peak`` is the largest total after any op. Tensors that existed before (the model's weights,
the data) are not counted, so ``peak`` is the step's *extra* memory over the weights: activations,
temporaries, perturbed copies, optimizer state created inside. tracemalloc cannot see torch's
allocations and RSS is blurred by the allocator; this counter is exact and portable.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as mem: ...`` then ``mem.peak`` / ``mem.current`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        nbytes = storage.nbytes()
        key = id(storage)
        if nbytes == 0 or key in self._live:
            return
        self._live[key] = weakref.ref(storage, lambda _r, k=key, n=nbytes: self._free(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(_storage(t)) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(_storage(t)) not in inputs:   # views / in-place: no new bytes
                self._track(t)
        return out


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


__all__ = ["LiveBytes"]
