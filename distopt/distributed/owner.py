"""The owner protocol over *any* sharded layout (DESIGN.md §4), shared by the FSDP2 and
DeepSpeed backends: the backend says which flat element range of every parameter each rank
holds (FSDP2: the ``Shard(0)`` rows; DeepSpeed ZeRO: the param's fragment of the rank's flat
fp32 partition), this module does the rest.

- **plan**: the parameters' *global* shapes and the recipe's per-parameter locality
  (:mod:`~distopt.distributed.specs`) go to :func:`~distopt.distributed.plan.plan_ownership`;
  every tensor/matrix parameter gets one owner rank, balanced by cost. Elementwise parameters are
  not moved: the backend's own partition already splits their state ~1/N, and an elementwise
  recipe is exact on any slice, so each rank updates its local fragment in place.
- **owner step** (``exact`` mode, the only mode so far): for the tensor/matrix parameters, one
  ``all_to_all`` sends every rank's local fragment of the gradient *and* of the value to the
  owner (fp32, or the param's dtype), which assembles the full tensors (padding never travels:
  only real elements are in a fragment), runs an *inner* optimizer of the same class and
  hyperparameters on a full-shape proxy parameter (its state lives only there), and a second
  ``all_to_all`` sends each rank exactly its fragment of the new values. Per step and matrix of
  ``n`` elements the traffic is ``2n`` in and ``n`` out, whatever the world size. Given the same
  reduced gradient the owner runs the single-process kernels on the same numbers, so the result
  equals the single-process step (bitwise for recipes whose kernels do not batch across
  parameters).
- A parameter without a gradient on every rank is skipped by every rank (one MAX all-reduce of
  1-byte flags); if some ranks have one, the others send zeros (no rank waits in a collective
  the others skip).

Future (not implemented): gradient-only transfer when the owner keeps an fp32 copy of the
value, bf16 communication, shard-local blocks, and overlapping the exchange with compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.core.operator import Locality
from distopt.core.shell import ChainOptimizer, DistOptimizer
from distopt.distributed.plan import BlockSpec, OwnershipPlan, ParamSpec, plan_ownership
from distopt.distributed.specs import param_spec


@dataclass
class Entry:
    """One parameter as the owner protocol sees it.

    ``ranges[r]`` is the ``[start, stop)`` range of the flattened *global* parameter that rank
    ``r`` holds (``start == stop``: nothing); ``value`` is this rank's persistent tensor over its
    range (sharing storage with the backend's buffer, any shape with that many elements), or
    None when the rank holds nothing. ``replicated`` params (every rank holds all of it, e.g. a
    plain tensor next to FSDP2 DTensors) are stepped locally on every rank."""

    name: str
    shape: tuple[int, ...]
    group: int
    dtype: torch.dtype
    ranges: list[tuple[int, int]]
    value: Tensor | None
    replicated: bool = False
    locality: Locality = Locality.ELEMENTWISE
    owner: int = -1
    proxy: Tensor | None = None
    inner: Tensor | None = field(default=None, repr=False)  # the tensor the inner optimizer steps

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


def make_inner(optimizer: DistOptimizer, groups: list[dict[str, Any]]) -> DistOptimizer:
    """An optimizer of the same class and hyperparameters as ``optimizer`` over ``groups``."""
    if isinstance(optimizer, ChainOptimizer):
        return ChainOptimizer(groups, optimizer._recipe, **{k: optimizer.defaults[k] for k in optimizer._extra})
    # only declared hyperparameters: torch's __setstate__ (run by every load_state_dict, e.g. in
    # accelerator.prepare) adds keys such as "differentiable" that distopt's validation refuses
    declared = type(optimizer).hyperparameters()
    return type(optimizer)(groups, **{k: v for k, v in optimizer.defaults.items() if k in declared})


def param_names(named_parameters: Any) -> dict[int, str]:
    """``id(param) -> name`` from a module, a mapping or ``named_parameters()`` pairs (None: empty)."""
    if named_parameters is None:
        return {}
    if isinstance(named_parameters, torch.nn.Module):
        named_parameters = named_parameters.named_parameters()
    if isinstance(named_parameters, Mapping):
        named_parameters = named_parameters.items()
    return {id(p): str(n) for n, p in named_parameters}


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


class OwnerStep:
    """Owner protocol for ``entries`` (same list, same order on every rank) of ``optimizer``
    (whose ``param_groups`` give the hyperparameters; they are copied into the inner optimizer
    at every step, so schedulers apply)."""

    def __init__(self, optimizer: DistOptimizer, entries: Sequence[Entry], process_group: Any = None) -> None:
        self.optimizer = optimizer
        self.entries = list(entries)
        self.pg = process_group
        self.world = dist.get_world_size(process_group) if dist.is_initialized() else 1
        self.rank = dist.get_rank(process_group) if dist.is_initialized() else 0
        self.comm = {"steps": 0, "all_to_all_bytes": 0, "all_reduce_bytes": 0, "collectives": 0}
        groups = optimizer.param_groups
        specs: list[ParamSpec] = []
        for e in self.entries:
            s = param_spec(optimizer, groups[e.group], e.name, e.shape, e.dtype, e.group)
            e.locality = s.locality
            if s.locality is not Locality.ELEMENTWISE and len(s.blocks) > 1:
                # whole-parameter ownership (blocks of a param are not split across ranks here)
                s = ParamSpec(s.name, s.shape, s.locality, s.total_cost, s.total_state,
                              (BlockSpec(None, s.total_cost, s.total_state),), s.itemsize, s.dtype, s.group)
            specs.append(s)
        self.plan: OwnershipPlan = plan_ownership(specs, self.world)
        for piece in self.plan.pieces:
            e = self.entries[piece.param]
            if not piece.is_slice and not e.replicated:
                e.owner = piece.rank
        inner_groups = [{"params": [], **_hyper(g)} for g in groups]
        for e in self.entries:
            if e.replicated or e.locality is Locality.ELEMENTWISE:
                if e.value is not None and e.value.numel() > 0:
                    e.inner = e.value
                    inner_groups[e.group]["params"].append(e.inner)
            elif e.owner == self.rank:
                e.proxy = torch.zeros(e.shape, dtype=e.dtype, device=self._device(e))
                e.inner = e.proxy
                inner_groups[e.group]["params"].append(e.proxy)
        self.inner = make_inner(optimizer, inner_groups)
        self.sharded = [i for i, e in enumerate(self.entries) if not e.replicated and e.locality is not Locality.ELEMENTWISE]

    def _device(self, e: Entry) -> torch.device:
        if e.value is not None:
            return e.value.device
        return torch.device("cuda", torch.cuda.current_device()) if self._nccl() else torch.device("cpu")

    def _nccl(self) -> bool:
        return dist.is_initialized() and "nccl" in str(dist.get_backend(self.pg))

    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self._nccl() else torch.device("cpu")

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, grads: Sequence[Tensor | None]) -> None:
        """``grads[i]``: this rank's local gradient fragment of entry ``i`` (same numel as its
        value; None: no gradient)."""
        for outer, inner in zip(self.optimizer.param_groups, self.inner.param_groups):
            inner.update(_hyper(outer))
        active = self._active(grads)
        for i, e in enumerate(self.entries):
            if e.inner is None or e.proxy is not None:
                continue
            g = grads[i]
            if not active[i]:
                e.inner.grad = None
            else:
                e.inner.grad = (torch.zeros_like(e.inner) if g is None else g.view(e.inner.shape))
        todo = [i for i in self.sharded if active[i]]
        if todo:
            self._gather_to_owners(todo, grads)
        self.inner.step()
        for e in self.entries:
            if e.inner is not None:
                e.inner.grad = None
        if todo:
            self._scatter_from_owners(todo)
        for outer, inner in zip(self.optimizer.param_groups, self.inner.param_groups):
            outer.update({k: v for k, v in inner.items() if k != "params"})
        self.comm["steps"] += 1

    def _active(self, grads: Sequence[Tensor | None]) -> list[bool]:
        has = [g is not None for g in grads]
        if self.world == 1:
            return has
        flags = torch.tensor(has, dtype=torch.uint8, device=self._comm_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.pg)
        self.comm["all_reduce_bytes"] += flags.numel()
        self.comm["collectives"] += 1
        return [bool(x) for x in flags.tolist()]

    def _len(self, i: int, r: int) -> int:
        a, b = self.entries[i].ranges[r]
        return b - a

    def _all_to_all(self, send: list[Tensor], recv_sizes: list[int], dtype: torch.dtype) -> list[Tensor]:
        dev = self._comm_device()
        sbuf = torch.cat([t.reshape(-1).to(device=dev) for t in send]) if send else torch.empty(0, dtype=dtype, device=dev)
        rbuf = torch.empty(sum(recv_sizes), dtype=dtype, device=dev)
        if self.world == 1:
            rbuf.copy_(sbuf)
        else:
            dist.all_to_all_single(rbuf, sbuf, output_split_sizes=recv_sizes,
                                   input_split_sizes=[t.numel() for t in send], group=self.pg)
            self.comm["collectives"] += 1
        self.comm["all_to_all_bytes"] += (sbuf.numel() + rbuf.numel()) * rbuf.element_size()
        return list(rbuf.split(recv_sizes))

    def _by_dtype(self, todo: list[int]) -> dict[torch.dtype, list[int]]:
        out: dict[torch.dtype, list[int]] = {}
        for i in todo:
            out.setdefault(self.entries[i].dtype, []).append(i)
        return out

    def _gather_to_owners(self, todo: list[int], grads: Sequence[Tensor | None]) -> None:
        me, n = self.rank, self.world
        for dtype, idx in self._by_dtype(todo).items():
            send = []
            for o in range(n):
                parts = []
                for i in idx:
                    e = self.entries[i]
                    if e.owner != o or self._len(i, me) == 0:
                        continue
                    g = grads[i]
                    parts.append(torch.zeros(self._len(i, me), dtype=dtype, device=e.value.device) if g is None
                                 else g.reshape(-1).to(dtype=dtype, device=e.value.device))
                    parts.append(e.value.reshape(-1))
                send.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype))
            mine = [i for i in idx if self.entries[i].owner == me]
            recv_sizes = [sum(2 * self._len(i, r) for i in mine) for r in range(n)]
            chunks = self._all_to_all([t.to(dtype) for t in send], recv_sizes, dtype)
            full_grads = {i: torch.zeros(self.entries[i].numel, dtype=dtype, device=self.entries[i].proxy.device)
                          for i in mine}
            for r in range(n):
                off = 0
                for i in mine:
                    k = self._len(i, r)
                    if k == 0:
                        continue
                    a, b = self.entries[i].ranges[r]
                    full_grads[i][a:b].copy_(chunks[r][off:off + k])
                    self.entries[i].proxy.view(-1)[a:b].copy_(chunks[r][off + k:off + 2 * k])
                    off += 2 * k
            for i in mine:
                e = self.entries[i]
                e.proxy.grad = full_grads[i].view(e.shape)

    def _scatter_from_owners(self, todo: list[int]) -> None:
        me, n = self.rank, self.world
        for dtype, idx in self._by_dtype(todo).items():
            mine = [i for i in idx if self.entries[i].owner == me]
            send = []
            for r in range(n):
                parts = [self.entries[i].proxy.reshape(-1)[slice(*self.entries[i].ranges[r])]
                         for i in mine if self._len(i, r)]
                send.append(torch.cat(parts) if parts else torch.empty(0, dtype=dtype))
            recv_sizes = [sum(self._len(i, me) for i in idx if self.entries[i].owner == o) for o in range(n)]
            chunks = self._all_to_all(send, recv_sizes, dtype)
            for o in range(n):
                off = 0
                for i in idx:
                    e = self.entries[i]
                    k = self._len(i, me)
                    if e.owner != o or k == 0:
                        continue
                    e.value.view(-1).copy_(chunks[o][off:off + k])
                    off += k


def gather_ranges(local: Sequence[tuple[int, int]], process_group: Any = None) -> list[list[tuple[int, int]]]:
    """Every rank's ``[start, stop)`` per entry: ``out[i][r]`` (one ``all_gather_object``)."""
    if not dist.is_initialized() or dist.get_world_size(process_group) == 1:
        return [[tuple(x)] for x in local]
    n = dist.get_world_size(process_group)
    got: list[Any] = [None] * n
    dist.all_gather_object(got, [tuple(x) for x in local], group=process_group)
    if any(len(g) != len(local) for g in got):
        raise RuntimeError("owner protocol: ranks disagree on the number of parameters "
                           f"({[len(g) for g in got]}); build the optimizer identically on every rank")
    return [[tuple(got[r][i]) for r in range(n)] for i in range(len(local))]

