"""FSDP2 (``torch.distributed.fsdp.fully_shard``) backend: any distopt recipe on DTensor params.

    fully_shard(block) for each block; fully_shard(model)
    opt = shard_aware(distopt.create("muon", model.parameters(), lr=0.02))
    ... loss.backward(); opt.step(); opt.zero_grad()

Under FSDP2 every parameter is a DTensor with placement ``Shard(0)``: rank r holds the rows
``torch.chunk`` gives it (uneven, possibly none; FSDP2's padding is outside the local tensor).
What the plain shell does on such params (measured, torch 2.13, 2 ranks, 10 steps): AdamW and Lion
are bitwise exact through DTensor dispatch; LAMB works through DTensor's norm reductions (6e-8
relative); Adafactor, Adam-mini, Muon, Shampoo, SOAP and GaLore raise inside DTensor dispatch
(mixed Tensor/DTensor foreach ops, in-place ops needing placement changes). This wrapper never
relies on DTensor dispatch; it works on the local tensors:

- elementwise parameters: the inner optimizer updates the *local* shard in place (exact on any
  slice; state ≈ 1/N per rank, where FSDP2 put the rows);
- tensor / matrix parameters: the owner protocol of :mod:`~distopt.distributed.owner`: each
  matrix has one owner rank (balanced by cost over the *global* shapes, ``DTensor.shape``); the
  gradient and value rows go to the owner (one all-to-all), the owner steps the full matrix with
  its state, and each rank gets back exactly its rows (one all-to-all). Empty shards send
  nothing; padding rows never travel.

Supported placements: ``Shard(0)`` on a 1-D mesh (FSDP2), ``Replicate()``, and plain tensors
(stepped identically on every rank). Anything else (2-D meshes, ``Shard(d>0)``) raises.

"Just works" from ``distopt.create``: :func:`dtensor_delegate` is the function a one-line hook
in ``DistOptimizer.step`` calls (see the README of this folder / the lead's integration); until
that hook exists, wrap explicitly with :func:`shard_aware`.

State is created lazily at the first ``step()`` (after Accelerate/FSDP2 swapped params for
DTensors: accelerate #3859). ``state_dict()`` is this rank's shard (with the layout hash).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.core.shell import DistOptimizer
from distopt.distributed.owner import Entry, OwnerStep, gather_ranges, param_names

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def _range(p: Tensor, rank: int) -> tuple[tuple[int, int], bool]:
    """(this rank's flat [start, stop) of the global param, replicated?)"""
    if not is_dtensor(p):
        return (0, p.numel()), True
    placements = tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return (0, p.numel()), True
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not (isinstance(placements[0], Shard)
                                                                and placements[0].dim == 0):
        raise NotImplementedError(
            f"distopt FSDP2 backend: parameter placements {placements} on a {p.device_mesh.ndim}-D mesh are not "
            "supported (only Shard(0) on a 1-D mesh, as fully_shard gives, or Replicate())")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    local = _local(p)
    if tuple(local.shape) != tuple(shape):
        raise RuntimeError(f"distopt FSDP2 backend: local shard {tuple(local.shape)} != expected {tuple(shape)}")
    cols = 1
    for s in p.shape[1:]:
        cols *= int(s)
    start = int(offset[0]) * cols if p.dim() else 0
    return (start, start + local.numel()), False


class ShardedOptimizer(torch.optim.Optimizer):
    """Run ``optimizer`` (a distopt recipe built over FSDP2's DTensor params) exactly as on one
    process (see the module docstring). ``param_groups`` are the wrapped optimizer's own list."""

    def __init__(self, optimizer: DistOptimizer, *, named_parameters: Any = None, process_group: Any = None) -> None:
        if not isinstance(optimizer, DistOptimizer):
            raise TypeError(f"shard_aware wraps distopt optimizers, got {type(optimizer).__name__}")
        if getattr(optimizer, "closure_kind", "backward") != "backward":
            raise ValueError(f"distopt FSDP2 backend: {optimizer.name!r} needs step(closure) over the whole model "
                             f"(closure_kind={optimizer.closure_kind!r}); sharded params are not supported for it")
        self._ready = False
        torch.optim.Optimizer.__init__(self, [{"params": []}], {})
        self.optimizer = optimizer
        self.process_group = process_group
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self._names = param_names(named_parameters)
        self._owner: OwnerStep | None = None
        self._params: list[Tensor] = []
        self._ready = True

    @property
    def name(self) -> str:
        return self.optimizer.name

    def _build(self) -> OwnerStep:
        pg = self.process_group
        rank = dist.get_rank(pg) if dist.is_initialized() else 0
        self._params = [p for g in self.param_groups for p in g["params"]]
        meshes = {id(p.device_mesh) for p in self._params if is_dtensor(p)}
        if pg is None and meshes:
            p0 = next(p for p in self._params if is_dtensor(p))
            pg = p0.device_mesh.get_group()
            rank = dist.get_rank(pg)
        local_ranges, rep = [], []
        for p in self._params:
            r, replicated = _range(p, rank)
            local_ranges.append(r)
            rep.append(replicated)
        ranges = gather_ranges(local_ranges, pg)
        entries = []
        gi_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        for k, p in enumerate(self._params):
            local = _local(p)
            value = local.detach() if local.numel() else None  # shares storage with the shard
            entries.append(Entry(self._names.get(id(p), f"{gi_of[k]}.{k}"), tuple(int(s) for s in p.shape),
                                 gi_of[k], p.dtype, [tuple(x) for x in ranges[k]], value, replicated=rep[k]))
        self.process_group = pg
        owner = OwnerStep(self.optimizer, entries, pg)
        self.state = owner.inner.state  # type: ignore[assignment]
        return owner

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._owner is None:
            self._owner = self._build()
        grads = []
        for e, p in zip(self._owner.entries, self._params):
            local = _local(p)
            if e.value is not None and local.data_ptr() != e.value.data_ptr():
                e.value.data = local.detach()  # FSDP2 re-pointed the shard: follow it
            # the DTensor grad exists on every rank or on none (an empty shard has an empty local grad)
            grads.append(None if p.grad is None else _local(p.grad))
        self._owner.step(grads)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", True):
            return super().add_param_group(param_group)
        raise NotImplementedError("shard_aware: add param groups to the wrapped optimizer before wrapping it")

    @property
    def comm(self) -> dict[str, int]:
        return self._owner.comm if self._owner is not None else {}

    def state_dict(self) -> dict[str, Any]:
        if self._owner is None:
            return {"state": {}, "param_groups": [], "fsdp": None}
        sd = self._owner.inner.state_dict()
        sd["fsdp"] = {"rank": self._owner.rank, "world_size": self._owner.world,
                      "layout": self._owner.plan.layout_hash(), "recipe": self.optimizer.name}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if self._owner is None:
            self._owner = self._build()
        meta = state_dict.get("fsdp") or {}
        mine = {"rank": self._owner.rank, "world_size": self._owner.world,
                "layout": self._owner.plan.layout_hash(), "recipe": self.optimizer.name}
        if any(meta.get(k) != v for k, v in mine.items()):
            raise ValueError(f"ShardedOptimizer.load_state_dict: shard saved for another layout ({meta} != {mine})")
        self._owner.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "fsdp"})

    def __repr__(self) -> str:
        return f"ShardedOptimizer({self.optimizer!r})"


def shard_aware(optimizer: DistOptimizer, *, named_parameters: Any = None,
                process_group: Any = None) -> torch.optim.Optimizer:
    """``optimizer`` made exact on FSDP2 DTensor params (a no-op wrapper's cost on plain ones)."""
    if isinstance(optimizer, ShardedOptimizer):
        return optimizer
    return ShardedOptimizer(optimizer, named_parameters=named_parameters, process_group=process_group)


def dtensor_delegate(optimizer: DistOptimizer) -> ShardedOptimizer | None:
    """For the shell's step hook: a :class:`ShardedOptimizer` when any param of ``optimizer`` is
    a DTensor, else None (the shell caches the answer while its param lists do not change)."""
    if any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"]):
        return ShardedOptimizer(optimizer)
    return None
