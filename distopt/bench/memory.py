"""Peak tensor memory on CPU, where torch has no allocator statistics.

:class:`LiveTensorCounter` is a ``TorchDispatchMode``: every tensor produced by an aten op while
it is active (parameters built inside it, activations, gradients, optimizer state, temporaries)
is counted once per storage, and subtracted when the storage is freed (a weak reference on the
``UntypedStorage``; torch keeps the Python storage object alive as long as the C++ storage lives,
the mechanism ``torch.distributed._tools.mem_tracker`` relies on). ``peak`` is the largest total
seen after any op. Tensors created before the mode (the data set) are not counted.

Every op pays a Python call, so the benchmark runs it on a separate short probe (a few steps),
never inside timed runs. On CUDA the runner uses ``torch.cuda.max_memory_allocated`` instead.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorCounter(TorchDispatchMode):
    """Track live tensor bytes created under the mode: ``current``, ``peak`` (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[tuple[int, int], weakref.ref] = {}

    def _release(self, key: tuple[int, int], nbytes: int) -> None:
        if self._seen.pop(key, None) is not None:
            self.current -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or nested tensors
            return
        nbytes = st.nbytes()
        key = (st.data_ptr(), id(st))
        if nbytes == 0 or key in self._seen:
            return
        self._seen[key] = weakref.ref(st, lambda _r, k=key, n=nbytes: self._release(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


__all__ = ["LiveTensorCounter"]
