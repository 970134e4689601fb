"""The optimizer shell: one ``torch.optim.Optimizer`` that runs a recipe per param group.

Hyperparameters live in ``param_groups`` (so LR schedulers, ``state_dict`` and wrappers such
as Opacus, DeepSpeed and Accelerate see a normal optimizer); each operator's buffers live in
``self.state[p]`` next to a torch-style ``step`` counter. A recipe is rebuilt from its group
at every step, so anything a scheduler or the user writes into the group takes effect.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Iterable, Mapping

import torch
from torch import Tensor

from distopt.core.chain import Chain
from distopt.core.compiled import has_scalar_float64_state, run_eagerly
from distopt.core.hyper import COMMON, Hyper, validate
from distopt.core.operator import StepContext
from distopt.core.state_dtypes import restore_saved_dtypes
from distopt.core.tensor_ops import TensorOps

Params = Iterable[Tensor] | Iterable[dict[str, Any]]
#: Called at the top of every ``step``: ``hook(optimizer)`` returns None (go on), or an optimizer
#: whose ``step`` runs instead (FSDP2: the shard-aware owner protocol), or raises to refuse a step
#: that would be silently wrong (a tensor/matrix recipe on DeepSpeed's flat partitions). Installed
#: by ``distopt/__init__.py``; the hooks import nothing heavy.
STEP_HOOKS: list[Callable[["DistOptimizer"], Any]] = []
Route = Callable[[Mapping[str, Any], list[Tensor], list[Tensor], list[dict[str, Any]]], None]


class DistOptimizer(torch.optim.Optimizer):
    """Base of every distopt optimizer. Subclasses declare ``name``, ``family``, ``hyper``
    (name -> :class:`~distopt.core.hyper.Hyper`), ``reference`` (what the tests compare it
    with) and implement :meth:`recipe`."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    hyper: ClassVar[Mapping[str, Hyper]] = {}
    reference: ClassVar[str] = ""
    #: what ``step(closure)`` needs from the closure:
    #: ``"backward"``: optional; it zeroes grads, computes the loss and calls ``backward()``;
    #: ``"create_graph"``: gradients must come from ``backward(create_graph=True)`` (Hessian-vector
    #: products: AdaHessian, Sophia); ``"forward"``: required, returns the loss without any backward
    #: (zeroth-order recipes re-evaluate it at perturbed parameters). Wrappers that cannot honour a
    #: kind (Opacus' DPOptimizer calls ``step()`` without the closure) refuse by reading this.
    closure_kind: ClassVar[str] = "backward"
    #: True: ``load_state_dict`` keeps each saved state tensor's dtype (see core/state_dtypes.py)
    #: instead of torch's cast of all state to the param's dtype
    keep_state_dtypes: ClassVar[bool] = False

    def __init__(self, params: Params, **hparams: Any) -> None:
        spec = self.hyperparameters()
        validate(self.name, spec, hparams)
        defaults = {k: h.default for k, h in spec.items()}
        defaults.update(hparams)
        super().__init__(params, defaults)

    @classmethod
    def hyperparameters(cls) -> dict[str, Hyper]:
        return {**cls.hyper, **COMMON}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        """The operator chain for one param group's hyperparameters."""
        raise NotImplementedError

    @classmethod
    def fast_route(cls, group: Mapping[str, Any]) -> Route | None:
        """A faster kernel computing exactly the recipe's math for this group, or None.

        It receives ``(group, params, grads, states)`` with states initialised by the recipe and
        must advance ``state["step"]`` itself. The per-tensor route (``foreach=False``) always
        runs the chain, so the conformance battery tests every fast route equal to the chain.
        """
        return None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        validate(self.name, self.hyperparameters(), {k: v for k, v in param_group.items() if k != "params"})
        super().add_param_group(param_group)
        # the tensors this optimizer was built with: a step on others (flat ZeRO partitions) is checked
        known = self.__dict__.setdefault("_distopt_params", {})
        for p in self.param_groups[-1]["params"]:
            known[id(p)] = weakref.ref(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self.keep_state_dtypes:
            restore_saved_dtypes(self, state_dict)

    def _step_delegate(self, hooks: list[Callable[["DistOptimizer"], Any]] | None = None) -> Any:
        """Ask ``hooks`` (default :data:`STEP_HOOKS`) only when the param lists changed since the last
        step (Accelerate, DeepSpeed and FSDP2 swap them in new lists), so a step pays O(groups), not
        O(params)."""
        lists = [g["params"] for g in self.param_groups]
        cached = self.__dict__.get("_distopt_hooked")
        if cached is not None and len(cached[0]) == len(lists) and all(
                a is b and len(a) == n for a, b, n in zip(lists, cached[0], cached[1])):
            return cached[2]
        delegate = next((d for d in (hook(self) for hook in (STEP_HOOKS if hooks is None else hooks))
                         if d is not None), None)
        self.__dict__["_distopt_hooked"] = (lists, [len(a) for a in lists], delegate)
        return delegate

    def _prepare(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{self.name} does not support sparse gradients")
            params.append(p)
            grads.append(p.grad)
        return params, grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        delegate = self._step_delegate()
        if delegate is not None:
            return delegate.step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = self._prepare(group)
            if params:
                self._step_group(group, params, grads)
        return loss

    def _step_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        recipe = self.recipe(group)
        ops = TensorOps(group["foreach"] is not False)
        states = []
        for p in params:
            state = self.state[p]
            if not state:
                # torch's convention: a CPU step counter, on the param's device for fused kernels
                state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if group.get("fused") else "cpu")
                state.update(recipe.init(p))
            states.append(state)
        traced = torch.compiler.is_compiling()  # torch.compile(opt.step): see distopt/core/compiled.py
        route = self.fast_route(group) if group["foreach"] is not False and not traced else None
        if route is not None:
            route(group, params, grads, states)
            return
        step_counts = [s["step"] for s in states]
        ops.add_(step_counts, 1.0)
        ctx = StepContext(group, params, states, [int(s.item()) for s in step_counts], ops)
        updates = ops.neg(grads) if group["maximize"] else grads
        if traced and has_scalar_float64_state(states):
            run_eagerly(recipe.update, updates, ctx)
        else:
            recipe.update(updates, ctx)

    def __repr__(self) -> str:
        return f"distopt.{type(self).__name__}({len(self.param_groups)} group(s), {self.defaults})"


class ChainOptimizer(DistOptimizer):
    """An optimizer from a user's own chain: ``ChainOptimizer(params, recipe, lr=1e-3)``.

    ``recipe`` is a :class:`Chain` or a callable ``group -> Chain``; any keyword arguments
    become group hyperparameters that the operators may read (``ApplyLR()`` reads ``lr``).
    """

    name = "chain"
    family = "custom"

    def __init__(self, params: Params, recipe: Chain | Callable[[Mapping[str, Any]], Chain], **hparams: Any) -> None:
        self._recipe = recipe if callable(recipe) and not isinstance(recipe, Chain) else (lambda group: recipe)
        self._extra = {k: Hyper(v) for k, v in hparams.items()}
        torch.optim.Optimizer.__init__(self, params, {**{k: h.default for k, h in COMMON.items()}, **hparams})

    def hyperparameters(self) -> dict[str, Hyper]:  # type: ignore[override]
        return {**self._extra, **COMMON}

    def recipe(self, group: Mapping[str, Any]) -> Chain:  # type: ignore[override]
        return self._recipe(group)
