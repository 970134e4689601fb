"""``torch.compile(opt.step)``: what the shell does differently while Dynamo traces a step.

- **Fast routes are skipped**: torch's foreach/fused Adam kernels, called the way a route calls
  them (a CPU tensor of per-param step sizes), fail under Dynamo's fake tensors ("Expected
  scalars to be on CPU, got meta"). The chain is the definition the battery holds every route
  equal to, so a compiled step runs the chain.
- **0-dim float64 CPU state is updated eagerly**: torch 2.13's Dynamo loses in-place updates of a
  0-dim float64 CPU tensor that enters the graph as an input (``v.copy_``, ``lerp_``, ``add_``...:
  the caller's tensor keeps its old value and the graph reads the old value after the update),
  while 0-dim float32 and 1-element tensors are fine. A recipe holding such state (NovoGrad's
  per-tensor ``grads_ema`` with float64 params) therefore runs its update outside the graph
  (:func:`torch.compiler.disable`), which is the eager computation. Reproduction (CPU)::

      state = {"v": torch.zeros((), dtype=torch.float64)}
      def f(g):
          state["v"].copy_(g.norm() ** 2)
          return g * state["v"]
      torch.compile(f, backend="aot_eager")(torch.ones(3, dtype=torch.float64))
      state["v"]  # tensor(0.) compiled, tensor(3.) eager; float32: tensor(3.) both

tests/conformance/test_battery.py::test_compiled_step_equals_eager runs every gradient recipe
compiled (``aot_eager``, float64) against the eager step, and a few with inductor. Only the plain
shell is compiled there; the sharded wrappers (ZeroOptimizer, FSDP2, DeepSpeed) and the
closure-driven recipes (zeroth order, Hessian-vector) run eagerly in their tests.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def has_scalar_float64_state(states: list[dict[str, Any]]) -> bool:
    """Whether any state tensor is 0-dim float64 on the CPU (the case Dynamo mis-handles)."""
    return any(torch.is_tensor(v) and v.ndim == 0 and v.dtype == torch.float64 and v.device.type == "cpu"
               for state in states for v in state.values())


@torch.compiler.disable
def run_eagerly(update: Callable[..., Any], *args: Any) -> Any:
    """``update(*args)`` outside the compiled graph."""
    return update(*args)


__all__ = ["has_scalar_float64_state", "run_eagerly"]
