"""distopt: every kind of deep-learning optimizer as composable E -> T -> Φ -> P operators.

    import distopt
    opt = distopt.create("adamw", model.parameters(), lr=3e-4, weight_decay=0.1)
    distopt.available("first_order")
"""
from __future__ import annotations

from distopt import optimizers as _optimizers  # noqa: F401  (registers the catalogue)
from distopt.core import (
    FAMILIES, Chain, ChainOptimizer, DistOptimizer, Locality, Operator, Stage, available, chain, create, get,
)
from distopt.core.accounting import state_bytes, state_bytes_per_param
from distopt.core.registry import _REGISTRY

from distopt.core import shell as _shell
from distopt.distributed.fsdp import dtensor_delegate as _dtensor_delegate
from distopt.integrations.deepspeed import refuse_foreign_params as _refuse_foreign_params
from distopt.zo import optimizer as _zo_optimizer

# FSDP2 first: Accelerate swaps params for DTensors, which must be handled, not refused
_shell.STEP_HOOKS[:] = [_dtensor_delegate, _refuse_foreign_params]
_zo_optimizer.ZO_STEP_HOOKS[:] = [_refuse_foreign_params]

__version__ = "0.1.0"

globals().update({cls.__name__: cls for cls in _REGISTRY.values()})

__all__ = [
    "FAMILIES", "Chain", "ChainOptimizer", "DistOptimizer", "Locality", "Operator", "Stage",
    "available", "chain", "create", "get", "state_bytes", "state_bytes_per_param", *sorted(cls.__name__ for cls in _REGISTRY.values()),
]
