"""The zeroth-order optimizer shell: probe the loss at perturbed parameters, then run the chain.

A step of a zeroth-order recipe (``closure_kind = "forward"``):

1. build the layout (:mod:`distopt.zo.layout`): every ``requires_grad`` parameter's place in the
   flat model vector, this rank's rows;
2. evaluate the closure at θ + ε d_k (and θ - ε d_k, or θ) for k < n, under ``torch.no_grad``,
   with the directions regenerated from ``(seed, step, k)`` (:mod:`distopt.zo.evaluate` for how
   the parameters are perturbed and restored exactly);
3. turn the losses into scalars (the estimator's, linear in the losses) and, data-parallel,
   average them over ``process_group`` (8 bytes per scalar, :mod:`distopt.zo.distributed`);
4. run the recipe's chain ``E -> T -> Φ -> P`` block by block: the E operator expands
   g = (1/n) Σ c_k d_k for a block of rows, the ordinary operators (weight decay, momentum,
   Adam moments, ApplyLR) consume it. Blocks are at most ``chunk_size`` elements (whole
   parameters when an operator needs whole tensors), so no full-size z or g ever exists.

``(seed, step, scalars, lr)`` is all a step depends on: ``record=True`` keeps them in
``optimizer.log`` (:mod:`distopt.zo.replay`).

Hyperparameters every zeroth-order recipe shares: ``lr``, ``eps`` (perturbation scale), ``n``
(perturbations per step), ``two_sided``, ``distribution`` (``"gaussian"`` | ``"rademacher"``),
``weight_decay``, ``seed``. ``eps``, ``n``, ``two_sided``, ``distribution`` and ``seed`` belong to
the step, not to a param group: all groups must agree on them. Constructor-only options (not
hyperparameters, not in ``state_dict``): ``process_group``, ``perturbation`` (``"auto"`` |
``"on_use"`` | ``"in_place"``), ``chunk_size`` (elements, default 65536), ``record``, ``model``
(the FSDP2 root, required with DTensor parameters, so the optimizer can reshard it between
perturbed forwards: FSDP2 keeps the root's gathered parameters after a no_grad forward).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from distopt.core.chain import Chain
from distopt.core.hyper import FLAG, Hyper, LR, WEIGHT_DECAY, gt, integer, one_of
from distopt.core.operator import Locality
from distopt.core.shell import DistOptimizer, Params
from distopt.core.tensor_ops import TensorOps
from distopt.zo.distributed import CommCounter
from distopt.zo.estimator import Losses, Probe, ZOContext, ZOEstimate
from distopt.zo.evaluate import DirectionShift, InPlace, OnUse, Perturbation
from distopt.zo.layout import Slot, build_slots, is_dtensor, state_rows
from distopt.zo.perturb import DISTRIBUTIONS
from distopt.zo.replay import ZOLog, ZOStepRecord, header

DEFAULT_CHUNK = 1 << 16

ZO_HYPER: dict[str, Hyper] = {
    "lr": LR,
    "eps": Hyper(1e-3, gt(0.0)),
    "n": Hyper(1, integer(1)),
    "two_sided": Hyper(True, FLAG),
    "distribution": Hyper("gaussian", one_of(*DISTRIBUTIONS)),
    "weight_decay": WEIGHT_DECAY,
    "seed": Hyper(0, integer(0)),
}
STEP_WIDE = ("eps", "n", "two_sided", "distribution", "seed")
PERTURBATIONS = ("auto", "on_use", "in_place")
#: checks run before a step when the param lists changed (filled by ``distopt/__init__``: DeepSpeed
#: ZeRO-1/2's flat fp32 partitions are refused). Not the shell's STEP_HOOKS: a zeroth-order recipe
#: handles DTensor shards itself and must not be delegated.
ZO_STEP_HOOKS: list[Callable[[DistOptimizer], Any]] = []


class ZOOptimizer(DistOptimizer):
    """Base of the zeroth-order recipes; a subclass only declares ``hyper`` and ``recipe``
    (whose first operator is a :class:`~distopt.zo.estimator.ZOEstimate`)."""

    family = "zeroth_order"
    closure_kind = "forward"
    hyper: ClassVar[Mapping[str, Hyper]] = ZO_HYPER
    #: evaluate f(θ) even for a two-sided step (conservative steps)
    needs_center: ClassVar[bool] = False

    def __init__(self, params: Params, *, process_group: Any = None, perturbation: str = "auto",
                 chunk_size: int = DEFAULT_CHUNK, record: bool = False, model: torch.nn.Module | None = None,
                 **hparams: Any) -> None:
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"{self.name}: perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ValueError(f"{self.name}: chunk_size must be an integer >= 1, got {chunk_size!r}")
        super().__init__(params, **hparams)
        self.process_group = process_group
        self.perturbation = perturbation
        self.chunk_size = chunk_size
        self.model = model
        self.comm = CommCounter()
        self.log: ZOLog | None = header(self) if record else None
        self._step_wide()

    # -- configuration ---------------------------------------------------------------------
    def _step_wide(self) -> dict[str, Any]:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in STEP_WIDE:
                if group[key] != first[key]:
                    raise ValueError(f"{self.name}: {key} must be the same in every param group (it belongs to "
                                     f"the step: one perturbation of all parameters), got {first[key]!r} and "
                                     f"{group[key]!r}")
        return {k: first[k] for k in STEP_WIDE}

    def _mode(self, slots: list[Slot]) -> str:
        sharded = any(s.sharded for s in slots)
        if any(is_dtensor(s.param) for s in slots) and self.model is None:
            raise ValueError(
                f"{self.name}: parameters are sharded (DTensor); pass model=<the fully_shard-ed root module> so the "
                "optimizer can reshard it between perturbed forward passes (FSDP2 keeps the root's gathered "
                "parameters after a forward under no_grad, which would hide the perturbation)")
        if self.perturbation == "auto":
            return "in_place" if sharded else "on_use"
        if self.perturbation == "on_use" and sharded:
            raise ValueError(f"{self.name}: perturbation='on_use' cannot see sharded (DTensor / ZeRO-3) parameters, "
                             "which FSDP / DeepSpeed gather into other tensors; use perturbation='in_place'")
        return self.perturbation

    def _estimator(self, recipe: Chain) -> ZOEstimate:
        est = recipe.operators[0] if len(recipe) else None
        if not isinstance(est, ZOEstimate):
            raise TypeError(f"{self.name}: the recipe's first operator must be a ZOEstimate, got {est!r}")
        return est

    def _states(self, slots: list[Slot]) -> list[dict[str, Any]]:
        states = []
        recipes: dict[int, Chain] = {}
        for slot in slots:
            state = self.state[slot.param]
            if not state:
                recipe = recipes.setdefault(slot.group, self.recipe(self.param_groups[slot.group]))
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state.update(recipe.init(slot.local))
            states.append(state)
        return states

    # -- evaluation --------------------------------------------------------------------------
    def _after_forward(self) -> None:
        """FSDP2 keeps the root's gathered parameters after a forward under no_grad; drop them so the
        next forward gathers the shards we perturbed or restored."""
        if self.model is None:
            return
        for module in self.model.modules():
            reshard = getattr(module, "reshard", None)
            if reshard is not None and type(module).__name__.startswith("FSDP"):
                reshard()

    def _evaluate(self, closure: Callable[[], Any], slots: list[Slot], pert: Perturbation | None,
                  inplace: InPlace | None, read: Callable[[Any], Any] = float) -> Any:
        """``read(closure())`` at θ + pert (θ when ``pert`` is None): a float, or with
        :meth:`step_per_example` the per-example loss vector."""
        if pert is None:
            if inplace is not None:
                inplace.restore()
            value = closure()
        elif inplace is not None:
            inplace.apply(pert)
            value = closure()
        else:
            mode = OnUse(slots, pert, self.chunk_size)
            with mode:
                value = closure()
            if not mode.touched:
                raise RuntimeError(
                    f"{self.name}: the closure read none of the parameters through torch functions, so the "
                    "perturbation had no effect (a torch.compile'd model, or a wrapper that copies parameters?); "
                    "construct the optimizer with perturbation='in_place'")
        self._after_forward()
        return read(value)

    def _average(self, values: list[float], slots: list[Slot]) -> list[float]:
        if self.process_group is None or self.process_group is False:
            return values
        return self.comm.all_reduce_mean(values, self.process_group, slots[0].local.device)

    def _probe(self, closure: Callable[[], Any], slots: list[Slot], states: list[dict], probe: Probe,
               ests: dict[int, ZOEstimate], inplace: InPlace | None,
               read: Callable[[Any], Any] = float) -> tuple[Losses, Any]:
        by_index = {s.index: st for s, st in zip(slots, states)}
        est = next(iter(ests.values()))
        center = None
        if est.needs_center or self.needs_center or not probe.two_sided:
            center = self._evaluate(closure, slots, None, inplace, read)
        plus, minus = [], []
        for k in range(probe.n):
            plus.append(self._evaluate(closure, slots, DirectionShift(ests, probe, k, probe.eps, by_index), inplace,
                                       read))
            if probe.two_sided:
                minus.append(self._evaluate(closure, slots, DirectionShift(ests, probe, k, -probe.eps, by_index),
                                            inplace, read))
        if center is not None:
            loss = center
        else:
            loss = sum(p + m for p, m in zip(plus, minus)) / (2 * probe.n)
        return Losses(center, plus, minus if probe.two_sided else None), loss

    def decide(self, closure: Callable[[], Any], slots: list[Slot], states: list[dict], probe: Probe,
               losses: Losses, inplace: InPlace | None) -> float:
        """The factor applied to every group's lr for this step (1: take the step). The conservative
        recipe overrides it to evaluate candidates."""
        return 1.0

    # -- the update ----------------------------------------------------------------------------
    def _row_chunks(self, recipe: Chain) -> bool:
        est = self._estimator(recipe)
        rest = recipe.operators[1:]
        return est.row_separable and all(op.locality == Locality.ELEMENTWISE for op in rest)

    def run_chain(self, group: Mapping[str, Any], slots: list[Slot], states: list[dict], probe: Probe,
                  targets: Callable[[Slot, slice], Tensor] | None = None) -> None:
        """Run ``recipe(group)`` over the rows of ``slots`` in buckets of <= ``chunk_size`` elements
        (one row block per call with ``foreach=False``). ``targets(slot, rows)`` gives the tensor
        the P stage writes (default: the parameter's own rows)."""
        recipe = self.recipe(group)
        ops = TensorOps(group["foreach"] is not False)
        chunked = self._row_chunks(recipe)
        bucket: list[tuple[Slot, dict, slice]] = []
        size = 0

        def flush() -> None:
            nonlocal bucket, size
            if not bucket:
                return
            params = [targets(s, r) if targets is not None else s.matrix[r] for s, _, r in bucket]
            views = [state_rows(s, st, r) for s, st, r in bucket]
            steps = [int(st["step"]) for _, st, _ in bucket]
            ctx = ZOContext(dict(group), params, views, steps, ops, probe=probe,
                            slots=[s for s, _, _ in bucket], rows=[r for _, _, r in bucket])
            recipe.update([None] * len(params), ctx)  # type: ignore[list-item]
            bucket, size = [], 0

        for slot, state in zip(slots, states):
            blocks = slot.blocks(self.chunk_size) if chunked else [slice(0, slot.local_rows)]
            for rows in blocks:
                bucket.append((slot, state, rows))
                size += (rows.stop - rows.start) * slot.cols
                if not ops.foreach or size >= self.chunk_size:
                    flush()
        flush()

    def chain_rows(self, group: Mapping[str, Any], slot: Slot, state: dict, rows: slice | Tensor, target: Tensor,
                   probe: Probe) -> None:
        """Run ``recipe(group)`` on ``rows`` of one parameter, writing into ``target`` (a copy of those
        rows): the parameter values a step would produce, without touching the parameter."""
        recipe = self.recipe(group)
        ctx = ZOContext(dict(group), [target], [state_rows(slot, state, rows)], [int(state["step"])],
                        TensorOps(group["foreach"] is not False), probe=probe, slots=[slot], rows=[rows])
        recipe.update([None], ctx)  # type: ignore[list-item]

    def _apply(self, slots: list[Slot], states: list[dict], probe: Probe, lr_scale: float) -> None:
        for state in states:
            state["step"] += 1
        if lr_scale == 0.0:
            return
        for gi, group in enumerate(self.param_groups):
            pairs = [(s, st) for s, st in zip(slots, states) if s.group == gi]
            if pairs:
                g = group if lr_scale == 1.0 else {**group, "lr": group["lr"] * lr_scale}
                self.run_chain(g, [s for s, _ in pairs], [st for _, st in pairs], probe)

    def _new_probe(self, states: list[dict]) -> Probe:
        hp = self._step_wide()
        step = 1 + max((int(st["step"]) for st in states), default=0)
        return Probe(hp["seed"], step, hp["n"], hp["eps"], hp["two_sided"], hp["distribution"])

    def _prepare_estimators(self, slots: list[Slot], states: list[dict], probe: Probe) -> dict[int, ZOEstimate]:
        """Each param group's estimator (the E operator of its recipe), prepared for this step. The
        scalars do not depend on group hyperparameters; the directions may (LOZO's rank)."""
        ests: dict[int, ZOEstimate] = {}
        for gi, group in enumerate(self.param_groups):
            pairs = [(s, st) for s, st in zip(slots, states) if s.group == gi]
            if not pairs:
                continue
            est = ests[gi] = self._estimator(self.recipe(group))
            est.prepare([s for s, _ in pairs], [st for _, st in pairs], probe, self.process_group)
        return ests

    # -- public --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(
                f"{self.name}: step() needs a closure that returns the loss (closure_kind='forward'): a "
                "zeroth-order step evaluates the loss at perturbed parameters, e.g. "
                "opt.step(lambda: loss_fn(model(x), y)); no backward() is needed")
        self._step_delegate(ZO_STEP_HOOKS)
        loss = self._step(closure, None)
        return torch.tensor(loss, dtype=torch.float64)

    @torch.no_grad()
    def step_per_example(self, closure: Callable[[], Tensor], reduce: Callable[[Tensor], list[float]]) -> Tensor:
        """One step whose ``closure`` returns the per-example losses (shape ``(B,)``) and whose scalars
        are ``reduce(per_example)``, where ``per_example`` (float64, shape ``(B, m)``) holds each
        example's m scalars from the recipe's estimator (which is linear in the losses, so it applies
        to the loss vectors as it does to their means). ``reduce`` returns the m scalars of the step:
        the column means give :meth:`step` on the mean loss; DP-ZO clips and noises here
        (:mod:`distopt.privacy.zo`). Everything after the scalars (directions, chain, log) is the
        recipe's own. ``process_group`` is not applied: ``reduce`` owns the aggregation. A recipe
        that evaluates more than its probes (``decide``, the conservative step) is refused.
        Returns the mean loss."""
        if type(self).decide is not ZOOptimizer.decide:
            raise ValueError(f"{self.name}: step_per_example() cannot run a recipe that decides among candidate "
                             "steps with extra loss evaluations (decide); use zo_sgd or another recipe")
        self._step_delegate(ZO_STEP_HOOKS)
        return self._step(closure, reduce).mean()

    def _step(self, closure: Callable[[], Any], reduce: Callable[[Tensor], list[float]] | None) -> Any:
        read = float if reduce is None else _loss_vector
        slots = build_slots(self.param_groups)
        if not slots:
            return read(closure())
        states = self._states(slots)
        probe = self._new_probe(states)
        ests = self._prepare_estimators(slots, states, probe)
        inplace = InPlace(slots, self.chunk_size) if self._mode(slots) == "in_place" else None
        try:
            losses, loss = self._probe(closure, slots, states, probe, ests, inplace, read)
            scalars = next(iter(ests.values())).scalars(probe, losses)
            if reduce is None:
                probe.scalars = self._average(scalars, slots)
            else:
                per_example = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in scalars], dim=1)
                probe.scalars = [float(v) for v in reduce(per_example)]
            factor = self.decide(closure, slots, states, probe, losses, inplace)
        finally:
            if inplace is not None:
                inplace.restore()
                self._after_forward()
        self._apply(slots, states, probe, factor)
        if self.log is not None:
            self.log.steps.append(ZOStepRecord(probe.step, probe.seed, list(probe.scalars),
                                               [float(g["lr"]) for g in self.param_groups], factor))
        return loss

    @torch.no_grad()
    def replay_step(self, record: ZOStepRecord) -> None:
        """Apply a logged step without evaluating anything (see :func:`distopt.zo.replay`)."""
        for group, lr in zip(self.param_groups, record.lr):
            group["lr"] = lr
        slots = build_slots(self.param_groups)
        states = self._states(slots)
        probe = self._new_probe(states)
        if probe.step != record.step or probe.seed != record.seed:
            raise ValueError(f"replay: the log's step {record.step} (seed {record.seed}) does not follow the "
                             f"optimizer's step {probe.step - 1} (seed {probe.seed})")
        probe.scalars = list(record.scalars)
        self._prepare_estimators(slots, states, probe)
        self._apply(slots, states, probe, record.choice)


def _loss_vector(value: Any) -> Tensor:
    """Per-example losses as a flat float64 tensor (for :meth:`ZOOptimizer.step_per_example`)."""
    losses = torch.as_tensor(value).detach().reshape(-1).to(torch.float64)
    if losses.numel() < 1:
        raise ValueError("step_per_example: the closure returned no losses; it must return one loss per example")
    return losses


def zo_hyper(**extra: Hyper) -> dict[str, Hyper]:
    """The shared zeroth-order hyperparameters plus a recipe's own."""
    return {**ZO_HYPER, **extra}


__all__ = ["DEFAULT_CHUNK", "PERTURBATIONS", "STEP_WIDE", "ZOOptimizer", "ZO_HYPER", "ZO_STEP_HOOKS", "zo_hyper"]
