"""Sharded optimizer state (DESIGN.md §4).

- :mod:`~distopt.distributed.plan`: the ownership plan (pure): elementwise state in flat slices,
  tensor/matrix state owned whole, balanced by a cost model.
- :mod:`~distopt.distributed.zero`: :class:`ZeroOptimizer` for DDP/torchrun.
- :mod:`~distopt.distributed.fsdp`: FSDP2 (``fully_shard``) through the owner protocol of
  :mod:`~distopt.distributed.owner`; ``distopt.create`` on a sharded model delegates to it.
- :mod:`~distopt.distributed.checkpoint`: torch.distributed.checkpoint save/load with resharding
  (import it explicitly; it loads torch.distributed.checkpoint).
"""
from distopt.distributed.plan import BlockSpec, OwnershipPlan, ParamSpec, Piece, plan_ownership
from distopt.distributed.specs import optimizer_specs, param_locality, recipe_specs
from distopt.distributed.zero import ZeroOptimizer

__all__ = [
    "BlockSpec", "OwnershipPlan", "ParamSpec", "Piece", "ZeroOptimizer", "optimizer_specs", "param_locality",
    "plan_ownership", "recipe_specs",
]
