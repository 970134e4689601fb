"""DeepSpeed ZeRO 1/2/3 for every distopt recipe.

    import distopt
    from distopt.integrations import deepspeed as dsi

    opt = distopt.create("muon", model.parameters(), lr=0.02)
    engine, optimizer, loader, scheduler = dsi.initialize(model=model, optimizer=opt, config=cfg)
    # same return values and arguments as deepspeed.initialize

Why an adapter is needed. Inside ZeRO the client optimizer does not see the model's parameters:
its ``param_groups`` hold *flat 1-D fp32 partitions* (ZeRO-1/2: one per group and rank, cut
through the middle of parameters; ZeRO-3: one per sub-group, every parameter cut in N equal
pieces, the last padded). Elementwise recipes (AdamW, Lion, ...) are exact on such slices, but a
tensor/matrix recipe would silently run its 1-D branch (Muon's AdamW fallback) or reduce over the
wrong elements (DeepSpeed PR #8438, LlamaFactory #8041).

:class:`DeepSpeedOptimizer` (what :func:`initialize` hands to ``deepspeed.initialize``) keeps the
model parameters it was built with and, at the first ``step()``, recovers the param -> slice
layout from the engine's own metadata:

- ZeRO-1/2: ``param._hp_mapping`` (``deepspeed.utils.tensor_fragment``): the fragment's offset
  inside the parameter (``lp_fragment_address``) and inside this rank's flat partition
  (``hp_fragment_address``); every rank's fragments are exchanged once (``all_gather_object``),
  so ``round_robin_gradients`` and alignment padding need no special case;
- ZeRO-3: ``param._z3_optimizer`` (``fp16_groups``, ``fp32_partitioned_groups_flat``,
  ``sub_group_to_group_id``) and ``param.ds_shape``/``ds_numel``/``partition_numel()``: rank r
  holds elements ``[r·s, min((r+1)·s, numel))`` of each parameter, concatenated per sub-group
  (DeepSpeed steps once per sub-group, so the protocol runs per sub-group);

then runs the owner protocol of :mod:`distopt.distributed.owner` with *global* shapes (never
``p.shape``, which is ``(0,)`` under ZeRO-3): elementwise parameters are updated in place on
their fragments of the flat partition, each tensor/matrix parameter is assembled on one owner
rank (gradient and value fragments: one all-to-all), stepped there with its whole state, and the
new values go back to the ranks holding its fragments (one all-to-all). Exact mode only:
communication per step = 3 × (elements of the tensor/matrix parameters) in fp32, on top of
DeepSpeed's own; faster modes (gradient-only transfer, bf16, sharded blocks) are future work.
DeepSpeed calls ``step()`` only at the gradient-accumulation boundary, so preconditioning runs
once per optimizer step (DeepSpeed #8443). Stage 0 / ZeRO disabled: the adapter is transparent.

Plain ``deepspeed.initialize`` with a tensor/matrix distopt recipe must refuse, never update
wrongly: :func:`refuse_foreign_params` is the check the optimizer shell runs whenever its param lists change (a
parameter in ``param_groups`` that the optimizer was not built with, under a recipe whose
locality is wider than elementwise, raises with a pointer to this module). With Accelerate
(which calls ``deepspeed.initialize`` itself) wrap the optimizer first:
``accelerator.prepare(model, distopt.integrations.deepspeed.wrap(opt), loader)``.

Zeroth-order recipes: :func:`initialize` hands them to :mod:`distopt.integrations.deepspeed_zo`
(engine without a DeepSpeed optimizer, ZeRO stage 0 or 3, scalar-only data parallelism).

Checkpoints. ``engine.save_checkpoint`` / ``engine.load_checkpoint`` resume exactly on the same
number of ranks and ZeRO stage: the adapter's ``state_dict()`` is this rank's owner-kept state (one
inner optimizer per group, ZeRO-1/2, or sub-group, ZeRO-3, keyed by that index, with the layout it
was built for), which DeepSpeed writes to the rank's own optimizer file; ``load_state_dict`` keeps
it until the owners are rebuilt at the first step and checks rank, world size, stage and layout
(another world size is refused: resharding needs distopt.distributed.checkpoint, DCP). Limits:
DeepSpeed's helpers that read the optimizer state by parameter (``safe_get_full_optimizer_state``,
universal checkpoints) do not see the owner-kept state. ``offload_optimizer: cpu`` (with
``zero_force_ds_cpu_optimizer: false``) is tested equal to one process on CPU ranks (ZeRO 1/2/3);
the owner exchange of offloaded fragments goes through the communication device, not tested on GPU.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from distopt.core.operator import Locality
from distopt.core.shell import DistOptimizer
from distopt.distributed.owner import Entry, OwnerStep, gather_ranges
from distopt.integrations.deepspeed_zo import check_zo_config, data_parallel_group, initialize_zo

_HINT = ("use distopt.integrations.deepspeed.initialize(model=..., optimizer=..., config=...) instead of "
         "deepspeed.initialize (same arguments and return values), or pass distopt.integrations.deepspeed.wrap(opt) "
         "to deepspeed.initialize / accelerator.prepare")


def _import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError('distopt.integrations.deepspeed needs DeepSpeed: pip install "distopt[deepspeed]"') from exc
    return deepspeed


def _names(model: Any) -> dict[int, str]:
    if isinstance(model, torch.nn.Module):
        return {id(p): n for n, p in model.named_parameters()}
    return {}


class DeepSpeedOptimizer(torch.optim.Optimizer):
    """A distopt optimizer made exact inside DeepSpeed ZeRO (see the module docstring). Its
    ``param_groups`` *are* the wrapped optimizer's (DeepSpeed edits them in place)."""

    def __init__(self, optimizer: DistOptimizer, *, names: Mapping[int, str] | None = None) -> None:
        if not isinstance(optimizer, DistOptimizer):
            raise TypeError(f"distopt.integrations.deepspeed wraps distopt optimizers, got {type(optimizer).__name__}")
        if getattr(optimizer, "closure_kind", "backward") == "forward":
            raise ValueError(f"distopt.integrations.deepspeed: {optimizer.name!r} is a zeroth-order recipe: it needs "
                             "step(closure) on the model's own parameters, which DeepSpeed's engine never passes and "
                             "ZeRO's flat partitions hide; use distopt.integrations.deepspeed.initialize(model=..., "
                             "optimizer=opt, config=...) (ZeRO stage 0 or 3, no DeepSpeed optimizer) and call "
                             "opt.step(closure) yourself")
        if getattr(optimizer, "closure_kind", "backward") != "backward":
            raise ValueError(f"distopt.integrations.deepspeed: {optimizer.name!r} needs step(closure) over the whole "
                             f"model (closure_kind={optimizer.closure_kind!r}), which DeepSpeed's engine never passes")
        self._ready = False
        torch.optim.Optimizer.__init__(self, [{"params": []}], {})
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.defaults = optimizer.defaults
        self.state = optimizer.state  # type: ignore[assignment]
        self.user_params: list[list[Tensor]] = [list(g["params"]) for g in optimizer.param_groups]
        self._groups = list(optimizer.param_groups)  # the group dicts DeepSpeed edits in place
        self.names = dict(names or {})
        self.stage: int | None = None
        self._owners: dict[int, OwnerStep] = {}  # id(flat partition) -> its owner protocol
        self._pending: dict[str, tuple[Any, dict[str, Any]]] = {}  # loaded owner state: key -> (layout, state)
        self._ready = True

    @property
    def name(self) -> str:
        return self.optimizer.name

    @property
    def comm(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for owner in self._owners.values():
            for k, v in owner.comm.items():
                total[k] = total.get(k, 0) + v
        return total

    # ------------------------------------------------------------------ layout discovery
    def _detect(self) -> int:
        flat = [p for ps in self.user_params for p in ps]
        if any(hasattr(p, "_z3_optimizer") or hasattr(p, "ds_shape") for p in flat):
            return 3
        if any(hasattr(p, "_hp_mapping") for p in flat):
            return 2
        if all(a is b for g, ps in zip(self.param_groups, self.user_params) for a, b in zip(g["params"], ps)) and \
                [len(g["params"]) for g in self.param_groups] == [len(ps) for ps in self.user_params]:
            return 0
        raise RuntimeError("distopt.integrations.deepspeed: the optimizer's parameters were replaced, but not by a "
                           "ZeRO optimizer this adapter knows (no _hp_mapping / ds_shape on the model parameters)")

    def _name(self, p: Tensor, gi: int, k: int) -> str:
        return self.names.get(id(p), f"{gi}.{k}")

    def _build_zero12(self, gi: int, flat: Tensor) -> OwnerStep:
        """ZeRO-1/2 calls step() once per param group (``_optimizer_step``): one protocol per group."""
        zopt = next((p._zero_optimizer for p in self.user_params[gi] if hasattr(p, "_zero_optimizer")), None)
        pg = zopt.real_dp_process_group[gi] if zopt is not None else None
        params = [p for p in self.user_params[gi] if p.requires_grad]
        local, spans = [], []
        for p in params:
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                local.append((0, 0))
                spans.append((0, 0))
            else:
                a = int(m.lp_fragment_address.start)
                local.append((a, a + int(m.lp_fragment_address.numel)))
                spans.append((int(m.hp_fragment_address.start), int(m.hp_fragment_address.numel)))
        ranges = gather_ranges(local, pg)
        entries = []
        for k, (p, (a, n), rr) in enumerate(zip(params, spans, ranges)):
            value = flat.detach().narrow(0, a, n) if n > 0 else None
            entries.append(Entry(self._name(p, gi, k), tuple(int(s) for s in p.shape), gi, flat.dtype,
                                 [tuple(x) for x in rr], value))
        return self._owner(f"group{gi}", entries, pg, spans)

    def _owner(self, key: str, entries: list[Entry], pg: Any, spans: list[tuple[int, int]]) -> OwnerStep:
        """The owner protocol of one group / sub-group, with the state loaded for ``key`` if any."""
        owner = OwnerStep(self.optimizer, entries, pg)
        owner._spans, owner._key = spans, key  # type: ignore[attr-defined]
        if key in self._pending:
            layout, state = self._pending.pop(key)
            if layout != _layout(owner):
                raise ValueError(f"distopt.integrations.deepspeed: the checkpoint's {key} holds other parameters "
                                 f"(saved layout {layout}, now {_layout(owner)}); load it into the model and "
                                 "param groups it was saved from")
            owner.inner.load_state_dict(state)
        return owner

    def _build_zero3(self, flat: Tensor) -> OwnerStep:
        params = [p for ps in self.user_params for p in ps]
        zopt = next(p._z3_optimizer for p in params if hasattr(p, "_z3_optimizer"))
        sg = next(i for i, f in enumerate(zopt.fp32_partitioned_groups_flat) if f is flat)
        gi = zopt.sub_group_to_group_id[sg]
        world = dist.get_world_size(zopt.dp_process_group)
        entries, off = [], 0
        spans = []
        for k, p in enumerate(zopt.fp16_groups[sg]):
            size = int(p.partition_numel())
            numel = int(p.ds_numel)
            rank = dist.get_rank(zopt.dp_process_group)
            ranges = [(min(r * size, numel), min((r + 1) * size, numel)) for r in range(world)]
            a, b = ranges[rank]
            value = flat.detach().narrow(0, off, b - a) if b > a else None
            spans.append((off, b - a))
            entries.append(Entry(self._name(p, gi, k), tuple(int(s) for s in p.ds_shape), gi, flat.dtype, ranges, value))
            off += size
        return self._owner(f"subgroup{sg}", entries, zopt.dp_process_group, spans)

    # ------------------------------------------------------------------ optimizer API
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if self.stage is None:
            self.stage = self._detect()
        if self.stage == 0:
            return self.optimizer.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # DeepSpeed steps one group (ZeRO-1/2) or one sub-group (ZeRO-3) per call, by swapping this
        # object's ``param_groups`` list (ZeRO-1/2) or the group's "params" (ZeRO-3)
        current = {id(g) for g in self.param_groups}
        for gi, group in enumerate(self._groups):
            if id(group) not in current:
                continue
            for flat in group["params"]:
                key = id(flat)
                if key not in self._owners:
                    self._owners[key] = self._build_zero12(gi, flat) if self.stage == 2 else self._build_zero3(flat)
                owner = self._owners[key]
                g = flat.grad
                grads = [None if g is None or n == 0 else g.narrow(0, a, n) for a, n in owner._spans]  # type: ignore[attr-defined]
                owner.step(grads)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_ready", True):
            return super().add_param_group(param_group)
        raise NotImplementedError("distopt.integrations.deepspeed: add param groups before wrapping")

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state_dict outside ZeRO (stage 0); else this rank's owner-kept state,
        per group / sub-group, including state loaded but not yet stepped (module docstring, Checkpoints)."""
        stage = self.stage if self.stage is not None else self._detect()
        if stage == 0:
            return self.optimizer.state_dict()
        states = {k: state for k, (_, state) in self._pending.items()}  # loaded, not yet stepped
        layouts = {k: layout for k, (layout, _) in self._pending.items()}
        for owner in self._owners.values():
            states[owner._key] = owner.inner.state_dict()  # type: ignore[attr-defined]
            layouts[owner._key] = _layout(owner)  # type: ignore[attr-defined]
        hypers = [{k: v for k, v in g.items() if k != "params"} for g in self._groups]
        return {"distopt_deepspeed": states, "layout": layouts, "stage": stage, "rank": _rank(),
                "world_size": _world(), "param_groups": hypers}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "distopt_deepspeed" not in state_dict:
            return self.optimizer.load_state_dict(state_dict)
        stage = self.stage if self.stage is not None else self._detect()
        saved = (state_dict["rank"], state_dict["world_size"], state_dict["stage"])
        if saved != (_rank(), _world(), stage):
            raise ValueError(f"distopt.integrations.deepspeed: this optimizer state was saved by rank {saved[0]} of "
                             f"{saved[1]} (ZeRO stage {'1/2' if saved[2] == 2 else saved[2]}), and this is rank "
                             f"{_rank()} of {_world()} (stage {'1/2' if stage == 2 else stage}): DeepSpeed "
                             "checkpoints of owner-kept state resume on the same ranks and stage only; to change the "
                             "world size, save and load with distopt.distributed.checkpoint (resharding)")
        if len(state_dict["param_groups"]) != len(self._groups):
            raise ValueError(f"distopt.integrations.deepspeed: the checkpoint has {len(state_dict['param_groups'])} "
                             f"param groups, this optimizer {len(self._groups)}")
        for group, hyper in zip(self._groups, state_dict["param_groups"]):
            group.update({k: v for k, v in hyper.items() if k != "params"})
        self._pending = {k: (state_dict["layout"][k], v) for k, v in state_dict["distopt_deepspeed"].items()}
        self._owners.clear()  # rebuilt at the next step, each taking its loaded state

    def __repr__(self) -> str:
        return f"DeepSpeedOptimizer({self.optimizer!r}, zero stage {self.stage})"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _layout(owner: OwnerStep) -> list[tuple]:
    """What an owner's inner state is indexed by: each entry's name, global shape and rank ranges."""
    return [(e.name, tuple(e.shape), tuple(tuple(r) for r in e.ranges)) for e in owner.entries]


def wrap(optimizer: DistOptimizer, model: Any = None) -> DeepSpeedOptimizer:
    """``optimizer`` as a client optimizer that is exact inside any ZeRO stage."""
    if isinstance(optimizer, DeepSpeedOptimizer):
        return optimizer
    return DeepSpeedOptimizer(optimizer, names=_names(model))


def initialize(*args: Any, model: Any = None, optimizer: Any = None, **kwargs: Any) -> Any:
    """``deepspeed.initialize`` with a distopt optimizer made exact under ZeRO 1/2/3: same
    arguments, same return values ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    A non-distopt optimizer (or a callable, or None) is passed through unchanged."""
    deepspeed = _import_deepspeed()
    if isinstance(optimizer, DistOptimizer) and getattr(optimizer, "closure_kind", "backward") == "forward":
        return initialize_zo(deepspeed, args, model, optimizer, kwargs)
    if isinstance(optimizer, DistOptimizer):
        optimizer = wrap(optimizer, model)
    return deepspeed.initialize(*args, model=model, optimizer=optimizer, **kwargs)


# ----------------------------------------------------------------------------- the refusal
def _foreign(optimizer: DistOptimizer, p: Tensor) -> bool:
    if hasattr(p, "ds_id") and not hasattr(p, "ds_shape"):  # ZeRO-3 flat fp32 partition
        return True
    known = optimizer.__dict__.get("_distopt_params")
    if known is None:
        return False
    ref = known.get(id(p))
    return ref is None or ref() is not p


def refuse_foreign_params(optimizer: DistOptimizer) -> None:
    """Raise if a tensor/matrix recipe is about to step tensors it was not built with (DeepSpeed
    ZeRO's flat partitions, FSDP1's FlatParameters): the update would silently be wrong. A
    zeroth-order recipe refuses any such tensor (it would perturb a copy the forward never reads)."""
    zo = getattr(optimizer, "closure_kind", "backward") == "forward"
    for group in optimizer.param_groups:
        bad = [p for p in group["params"] if _foreign(optimizer, p)]
        if bad and zo:
            raise RuntimeError(
                f"distopt: zeroth-order {optimizer.name!r} would perturb tensors it was not built with (shapes "
                f"{[tuple(p.shape) for p in bad[:3]]}): DeepSpeed ZeRO replaced the parameters by flat 1-D "
                "partitions of an fp32 master copy that the model's forward never reads. Use "
                "distopt.integrations.deepspeed.initialize(model=..., optimizer=opt, config=...) (ZeRO stage 0 or 3).")
        if bad and optimizer.recipe(group).locality is not Locality.ELEMENTWISE:  # cheap check first
            raise RuntimeError(
                f"distopt: {optimizer.name!r} needs whole tensors/matrices (locality "
                f"{optimizer.recipe(group).locality.name}), but its param_groups now hold tensors it was not built "
                f"with (shapes {[tuple(p.shape) for p in bad[:3]]}): DeepSpeed ZeRO replaced the parameters by flat "
                f"1-D partitions, so the update would be wrong. {_HINT}.")


__all__ = ["DeepSpeedOptimizer", "check_zo_config", "data_parallel_group", "initialize", "refuse_foreign_params",
           "wrap"]
