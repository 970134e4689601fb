"""One spelling for list-of-tensor math, run either with ``torch._foreach_*`` kernels or
with a plain per-tensor loop.

Operators are written once against :class:`TensorOps` (``ops.lerp_(m, g, 0.1)``); the
optimizer's ``foreach`` hyperparameter picks the route. The two routes compute the same
math and are tested equal (``tests/conformance``). Any list argument is taken per tensor;
anything else (a float, a 0-dim tensor) is broadcast to every tensor.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def _nth(arg: Any, i: int) -> Any:
    return arg[i] if isinstance(arg, list) else arg


class TensorOps:
    """``ops.NAME(xs, *args, **kwargs)`` for every ``torch._foreach_NAME``.

    In-place names (ending in ``_``) return ``xs``; the others return a new list.
    """

    def __init__(self, foreach: bool) -> None:
        self.foreach = foreach

    def __getattr__(self, name: str) -> Callable[..., list[Tensor]]:
        if name.startswith("__"):
            raise AttributeError(name)
        if self.foreach:
            kernel = getattr(torch, f"_foreach_{name}")

            def run_foreach(xs: list[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
                if not xs:
                    return xs
                out = kernel(xs, *args, **kwargs)
                return xs if name.endswith("_") else list(out)

            return run_foreach

        def run_loop(xs: list[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
            outs = []
            for i, x in enumerate(xs):
                a = [_nth(arg, i) for arg in args]
                k = {key: _nth(v, i) for key, v in kwargs.items()}
                outs.append(_per_tensor(name, x, a, k))
            return xs if name.endswith("_") else outs

        return run_loop


def _per_tensor(name: str, x: Tensor, args: list[Any], kwargs: dict[str, Any]) -> Tensor:
    if name in ("norm", "max", "maximum", "minimum", "sign", "sqrt", "abs", "neg"):
        fn = getattr(torch, {"max": "amax"}.get(name, name))
        return fn(x, *args, **kwargs)
    if name in ("maximum_", "minimum_"):
        return x.copy_(getattr(torch, name[:-1])(x, *args, **kwargs))
    return getattr(x, name)(*args, **kwargs)
