"""``torch.compile(opt.step)`` equals the eager step, for every gradient recipe of the registry.

Dynamo + AOT autograd (``aot_eager``: the graph capture, functionalization of the in-place
state updates and the guards, without code generation) in float64, where a lost or reordered
update shows; and inductor (C++ code generation on the CPU) for a few recipes, in float32 up to
its re-associated sums. A counting backend proves each compiled run captured graphs (Dynamo
falls back to eager silently when it gives up). The shell's compile rules are in
distopt/core/compiled.py: fast routes off, 0-dim float64 state (NovoGrad) updated eagerly.
Closure-driven recipes (zeroth order, Hessian-vector) are not compiled here.
"""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

import distopt

GRADIENT = [n for n in distopt.available() if distopt.get(n).closure_kind == "backward"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(name: str, dtype: torch.dtype, backend: Any = None, steps: int = 4) -> torch.Tensor:
    """``steps`` steps on a matrix and a vector with fixed gradients; compiled with ``backend``."""
    torch.manual_seed(0)
    params = [torch.randn(8, 6, dtype=dtype, requires_grad=True), torch.randn(6, dtype=dtype, requires_grad=True)]
    opt = distopt.create(name, params, lr=1e-2)
    step = torch.compile(opt.step, backend=backend) if backend is not None else opt.step
    for i in range(steps):
        for p in params:
            p.grad = torch.sin(p.detach() * (i + 1))
        step()
    return torch.cat([p.detach().reshape(-1) for p in params])


def _compiled(name: str, dtype: torch.dtype, backend: str) -> torch.Tensor:
    graphs: list[Any] = []
    inner = torch._dynamo.lookup_backend(backend)

    def counting(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return inner(gm, example_inputs)

    torch._dynamo.reset()  # no cache and no recompile limit carried over from another recipe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's graph-break notices (Tensor.item() for the step count)
        out = _run(name, dtype, counting)
    assert graphs, f"{name}: Dynamo captured no graph (the step ran eagerly)"
    return out


@pytest.mark.parametrize("name", GRADIENT)
def test_compiled_step_equals_eager(name: str) -> None:
    eager = _run(name, torch.float64)
    assert (eager - _run(name, torch.float64, steps=0)).abs().max() > 0
    torch.testing.assert_close(_compiled(name, torch.float64, "aot_eager"), eager, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name,dtype", [("adamw", torch.float32), ("shampoo", torch.float32),
                                        ("novograd", torch.float64)])
def test_inductor_step_equals_eager(name: str, dtype: torch.dtype) -> None:
    eager = _run(name, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-15}
    torch.testing.assert_close(_compiled(name, dtype, "inductor"), eager, **tol)
