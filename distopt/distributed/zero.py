"""ZeRO-partitioned optimizer state over plain DDP (ZeRO-1 semantics), for any distopt recipe.

    model = DDP(net)                                     # gradients all-reduced by DDP
    opt = distopt.create("muon", net.parameters(), lr=0.02)
    opt = ZeroOptimizer(opt, named_parameters=net.named_parameters())
    ... loss.backward(); opt.step(); opt.zero_grad()

Protocol (DESIGN.md §4), with the :mod:`~distopt.distributed.plan` shared by every backend:

- **plan**: every rank computes the same :class:`~distopt.distributed.plan.OwnershipPlan` from
  the params' global shapes and the recipe (:mod:`~distopt.distributed.specs`): elementwise
  params are cut in flat slices, tensor/matrix params (or their declared blocks) owned whole,
  balanced by cost;
- **owner step**: each rank runs an *inner* optimizer of the same class and hyperparameters
  over what it owns: for a slice a view ``p.detach().view(-1)[a:b]`` (its ``.grad`` set to the
  matching view of the already-reduced gradient, so in-place updates land in ``p``), for an
  owned param ``p`` itself. The state therefore exists once across ranks (≈ 1/N per rank),
  and, given the same reduced gradient, the owner's step runs the same kernels on the same
  numbers as the single-process step (slice cuts fall on multiples of ``align`` elements, so
  even the vectorised chunking is unchanged);
- **gather**: one all-gather per (dtype, device) bucket of every rank's updated values (padded
  to the longest rank), unpacked into the params, so all ranks hold identical params; when the
  shares are unequal (padding > 10 %: whole tensors of very different sizes) each owner
  broadcasts its exact share instead. With fp32 communication the result equals the
  single-process run bit for bit.
- A parameter without a gradient on every rank is skipped by every rank (a 1-byte-per-param
  MAX all-reduce of "has grad" flags makes the decision global, so no rank ever waits in a
  collective the others skip; ``check_grads=False`` drops it when DDP guarantees agreement).
  If only some ranks have a gradient, the others use zeros, as DDP would.

Grad-free recipes (closure kind ``"forward"``: zeroth-order) and Hessian-vector recipes
(``"create_graph"``) are refused: they need the whole model inside the closure, not a slice.

The wrapper *is* a ``torch.optim.Optimizer``: ``param_groups`` is the wrapped optimizer's own
list (LR schedulers and user edits apply; hyperparameters are copied into the inner
optimizer at every step), ``state`` is this rank's shard (so :func:`distopt.state_bytes`
measures per-rank bytes), ``state_dict()``/``load_state_dict()`` save and restore this rank's
shard for the same world size and layout; :mod:`distopt.distributed.checkpoint` saves a
world-size independent checkpoint (resharding). ``comm`` counts collective payload bytes.

Limits: operators that reduce *across* the tensors of a group (a group-wide norm) cannot be
expressed by a locality and are not supported; build the wrapper after the model sits on its
final device and dtype (views are re-pointed if a param's storage moves, but dtype changes are
not followed).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.core.shell import DistOptimizer
from distopt.distributed.owner import make_inner, param_names
from distopt.distributed.plan import OwnershipPlan, Piece, plan_ownership
from distopt.distributed.specs import optimizer_specs

_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def target_view(p: Tensor, piece: Piece) -> Tensor:
    """The part of ``p`` (detached, sharing storage) that ``piece`` covers."""
    d = p.detach()
    if piece.is_slice:
        return d.view(-1)[piece.start:piece.stop]
    if piece.box is None:
        return d
    if len(piece.box) == d.dim():
        return d[tuple(slice(a, b) for a, b in piece.box)]
    return d.view(d.shape[0], -1)[tuple(slice(a, b) for a, b in piece.box)]


def grad_view(g: Tensor, piece: Piece) -> Tensor:
    if piece.is_slice:
        return g.reshape(-1)[piece.start:piece.stop]
    if piece.box is None:
        return g
    if len(piece.box) == g.dim():
        return g[tuple(slice(a, b) for a, b in piece.box)]
    return g.reshape(g.shape[0], -1)[tuple(slice(a, b) for a, b in piece.box)]


def _refuse(optimizer: Any) -> None:
    if not isinstance(optimizer, DistOptimizer):
        raise TypeError(
            f"ZeroOptimizer wraps distopt optimizers (distopt.create(...)), got {type(optimizer).__module__}."
            f"{type(optimizer).__name__}: only a distopt recipe declares the locality of its operators, which "
            "decides how its state may be split. For a torch.optim optimizer use "
            "torch.distributed.optim.ZeroRedundancyOptimizer."
        )
    kind = getattr(optimizer, "closure_kind", "backward")
    if kind == "forward":
        raise ValueError(
            f"ZeroOptimizer: {optimizer.name!r} is a zeroth-order recipe (closure_kind='forward'): it perturbs the "
            "whole model and re-evaluates the loss inside step(closure), so its update cannot be computed slice by "
            "slice. Under data parallelism run it unwrapped on every rank with a shared seed: ranks then only "
            "exchange the projected-gradient scalars (DESIGN.md §5)."
        )
    if kind == "create_graph":
        raise ValueError(
            f"ZeroOptimizer: {optimizer.name!r} needs Hessian-vector products through the whole model's autograd "
            "graph (closure_kind='create_graph'), which a rank owning a slice of the state cannot form; run it "
            "unwrapped under DDP."
        )


class ZeroOptimizer(torch.optim.Optimizer):
    """Partition ``optimizer``'s state across the ranks of ``process_group`` (see the module
    docstring). ``named_parameters`` (a module, a mapping or ``(name, param)`` pairs) names the
    params in checkpoints; ``align`` is the slice granularity in elements."""

    #: all-gather (padded) when the ranks' shares fill at least this fraction of N x the longest;
    #: otherwise every owner broadcasts its exact share
    PAD_LIMIT = 0.9

    def __init__(self, optimizer: DistOptimizer, process_group: Any = None, *, named_parameters: Any = None,
                 align: int = 64, check_grads: bool = True) -> None:
        _refuse(optimizer)
        self._ready = False
        torch.optim.Optimizer.__init__(self, [{"params": []}], {})
        self.optimizer = optimizer
        self.process_group = process_group
        if dist.is_available() and dist.is_initialized():
            self.world_size = dist.get_world_size(process_group)
            self.rank = dist.get_rank(process_group)
            self._backend = str(dist.get_backend(process_group))
        else:
            self.world_size, self.rank, self._backend = 1, 0, "none"
        self.check_grads = check_grads
        self._params: list[Tensor] = [p for g in optimizer.param_groups for p in g["params"]]
        self._group_of: list[int] = [gi for gi, g in enumerate(optimizer.param_groups) for _ in g["params"]]
        self.names = param_names(named_parameters)
        self.plan: OwnershipPlan = plan_ownership(optimizer_specs(optimizer, self.names), self.world_size, align)
        for piece in self.plan.pieces:
            p = self._params[piece.param]
            if (piece.is_slice or (piece.box is not None and len(piece.box) != p.dim())) and not p.is_contiguous():
                raise ValueError(f"ZeroOptimizer: parameter {self.plan.params[piece.param].name} is not contiguous; "
                                 "call .contiguous() on it (or on the module's params) before wrapping")

        # this rank's pieces: persistent tensors the inner optimizer keys its state by
        self.local: list[tuple[Piece, Tensor]] = []
        keys = set(optimizer.defaults)
        inner_groups = [{"params": [], **{k: v for k, v in g.items() if k in keys and k != "params"}}
                        for g in optimizer.param_groups]
        for piece in self.plan.for_rank(self.rank):
            p = self._params[piece.param]
            t = p if (not piece.is_slice and piece.box is None) else target_view(p, piece)
            self.local.append((piece, t))
            inner_groups[self._group_of[piece.param]]["params"].append(t)
        self.inner = make_inner(optimizer, inner_groups)
        self._sync_in()
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.comm: dict[str, int] = {"steps": 0, "all_gather_bytes": 0, "broadcast_bytes": 0, "all_reduce_bytes": 0,
                                     "collectives": 0}
        self._buckets = self._make_buckets()
        if optimizer.state:
            self._import_state(optimizer)
        self._ready = True

    # ------------------------------------------------------------------ plumbing
    @property  # type: ignore[override]
    def state(self) -> Any:
        """This rank's shard: the inner optimizer's state (read live: ``load_state_dict`` replaces it)."""
        inner = self.__dict__.get("inner")
        return inner.state if inner is not None else self.__dict__.get("_placeholder_state", {})

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns a placeholder
        self.__dict__["_placeholder_state"] = value

    @property
    def name(self) -> str:
        return self.optimizer.name

    def _sync_in(self) -> None:
        for outer, inner in zip(self.optimizer.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in outer.items() if k != "params"})

    def _sync_out(self) -> None:
        for outer, inner in zip(self.optimizer.param_groups, self.inner.param_groups):
            outer.update({k: v for k, v in inner.items() if k != "params"})

    def _make_buckets(self) -> dict[tuple[torch.dtype, torch.device], list[list[Piece]]]:
        buckets: dict[tuple[torch.dtype, torch.device], list[list[Piece]]] = {}
        for piece in self.plan.pieces:
            p = self._params[piece.param]
            per_rank = buckets.setdefault((p.dtype, p.device), [[] for _ in range(self.world_size)])
            per_rank[piece.rank].append(piece)
        return buckets

    def _flag_device(self) -> torch.device:
        if "nccl" in self._backend:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _active(self) -> list[bool]:
        has = [p.grad is not None for p in self._params]
        if self.world_size == 1 or not self.check_grads:
            return has
        flags = torch.tensor(has, dtype=torch.uint8, device=self._flag_device())
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        self.comm["all_reduce_bytes"] += flags.numel()
        self.comm["collectives"] += 1
        return [bool(x) for x in flags.tolist()]

    def _refresh(self, piece: Piece, t: Tensor) -> None:
        """Re-point a slice view if its param's storage moved (e.g. ``p.data = ...``)."""
        if t is self._params[piece.param]:
            return
        fresh = target_view(self._params[piece.param], piece)
        if fresh.data_ptr() != t.data_ptr() or fresh.device != t.device:
            t.data = fresh

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        active = self._active()
        self._sync_in()
        for piece, t in self.local:
            self._refresh(piece, t)
            if not active[piece.param]:
                if t is not self._params[piece.param]:
                    t.grad = None
                continue
            p = self._params[piece.param]
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if t is p:
                p.grad = g
            else:
                t.grad = grad_view(g, piece)
        self.inner.step()
        for piece, t in self.local:
            if t is not self._params[piece.param]:
                t.grad = None
        self._sync_out()
        self._gather(active)
        self.comm["steps"] += 1
        return loss

    @torch.no_grad()
    def _gather(self, active: list[bool]) -> None:
        """All-gather every rank's updated pieces (padded to the longest) into the params."""
        n = self.world_size
        if n == 1:
            return
        for (dtype, device), per_rank in self._buckets.items():
            pieces = [[pc for pc in lst if active[pc.param]] for lst in per_rank]
            sizes = [sum(pc.numel for pc in lst) for lst in pieces]
            size = max(sizes)
            if size == 0:
                continue
            mine = pieces[self.rank]
            itemsize = torch.empty((), dtype=dtype).element_size()
            if sum(sizes) >= self.PAD_LIMIT * n * size:
                # balanced shares: one all-gather of buffers padded to the longest share
                send = torch.zeros(size, dtype=dtype, device=device)
                if mine:
                    torch.cat([target_view(self._params[pc.param], pc).reshape(-1) for pc in mine],
                              out=send[:sizes[self.rank]])
                recv = torch.empty(n * size, dtype=dtype, device=device)
                if _GATHER_SINGLE is not None:
                    _GATHER_SINGLE(recv, send, group=self.process_group)
                else:  # pragma: no cover - old torch
                    dist.all_gather(list(recv.chunk(n)), send, group=self.process_group)
                self.comm["all_gather_bytes"] += n * size * itemsize
                self.comm["collectives"] += 1
                chunks = [recv[r * size:r * size + sizes[r]] for r in range(n)]
            else:
                # unequal shares (whole tensors of very different sizes): each owner broadcasts
                # exactly its share, no padding (as torch's ZeroRedundancyOptimizer does)
                chunks = []
                for r in range(n):
                    if sizes[r] == 0:
                        chunks.append(None)
                        continue
                    if r == self.rank:
                        buf = torch.cat([target_view(self._params[pc.param], pc).reshape(-1) for pc in mine])
                    else:
                        buf = torch.empty(sizes[r], dtype=dtype, device=device)
                    dist.broadcast(buf, dist.get_global_rank(self.process_group, r)
                                   if self.process_group is not None else r, group=self.process_group)
                    self.comm["broadcast_bytes"] += sizes[r] * itemsize
                    self.comm["collectives"] += 1
                    chunks.append(buf)
            for r in range(n):
                if r == self.rank or not pieces[r]:
                    continue
                offset = 0
                for pc in pieces[r]:
                    view = target_view(self._params[pc.param], pc)
                    view.copy_(chunks[r][offset:offset + pc.numel].view(view.shape))
                    offset += pc.numel

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", True):  # torch.optim.Optimizer.__init__'s placeholder group
            return super().add_param_group(param_group)
        raise NotImplementedError("ZeroOptimizer: add all param groups to the wrapped optimizer before wrapping it")

    def _call_and_sync(self, method: str) -> None:
        fn = getattr(self.inner, method, None)
        if not callable(fn):
            raise AttributeError(f"{type(self.optimizer).__name__} has no {method}()")
        self._sync_in()
        fn()
        self._sync_out()
        self._gather([True] * len(self._params))

    def train(self) -> None:
        """Schedule-free recipes: swap to the training point on every rank (collective)."""
        self._call_and_sync("train")

    def eval(self) -> None:
        """Schedule-free recipes: swap to the averaged point on every rank (collective)."""
        self._call_and_sync("eval")

    # ------------------------------------------------------------------ state of this rank
    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the inner optimizer's ``state_dict`` plus the layout it belongs to."""
        self._sync_in()
        sd = self.inner.state_dict()
        sd["zero"] = {"rank": self.rank, "world_size": self.world_size, "layout": self.plan.layout_hash(),
                      "recipe": self.optimizer.name}
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        meta = state_dict.get("zero")
        if meta is None:
            raise ValueError("ZeroOptimizer.load_state_dict: not a ZeroOptimizer shard (no 'zero' entry); load a "
                             "single-process state_dict into the wrapped optimizer before wrapping, or use "
                             "distopt.distributed.checkpoint")
        mine = {"rank": self.rank, "world_size": self.world_size, "layout": self.plan.layout_hash(),
                "recipe": self.optimizer.name}
        diff = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
        if diff:
            raise ValueError("ZeroOptimizer.load_state_dict: shard saved for another layout "
                             + ", ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
                             + "; use distopt.distributed.checkpoint to reshard")
        self.inner.load_state_dict({k: v for k, v in state_dict.items() if k != "zero"})
        self._sync_out()

    def _import_state(self, optimizer: DistOptimizer) -> None:
        """Shard a single-process state already present in the wrapped optimizer, then drop it."""
        for piece, t in self.local:
            p = self._params[piece.param]
            if p not in optimizer.state:
                continue
            self.inner.state[t] = shard_state(optimizer.state[p], p, piece)
        optimizer.state.clear()

    def __repr__(self) -> str:
        return (f"ZeroOptimizer({self.optimizer!r}, rank {self.rank}/{self.world_size}, "
                f"{len(self.local)} piece(s), {sum(pc.numel for pc, _ in self.local)} elements)")


def shard_state(state: Mapping[str, Any], p: Tensor, piece: Piece) -> dict[str, Any]:
    """The part of a param's single-process state that ``piece`` owns."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor) or (not piece.is_slice and piece.box is None):
            out[k] = v.clone() if isinstance(v, Tensor) else v
        elif piece.is_slice and v.shape == p.shape:
            out[k] = v.detach().reshape(-1)[piece.start:piece.stop].clone()
        elif piece.is_slice and v.dim() == 0:
            out[k] = v.clone()
        else:
            raise ValueError(f"cannot split state buffer {k!r} of shape {tuple(v.shape)} for a param of shape "
                             f"{tuple(p.shape)}")
    return out

