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

__version__ = "0.1.0"

globals().update({cls.__name__: cls for cls in _REGISTRY.values()})

__all__ = [
    "FAMILIES", "Chain", "ChainOptimizer", "DistOptimizer", "Locality", "Operator", "Stage",
    "available", "chain", "create", "get", "state_bytes", "state_bytes_per_param", *sorted(cls.__name__ for cls in _REGISTRY.values()),
]
