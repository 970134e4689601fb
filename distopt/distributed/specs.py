"""From an optimizer (or optimizer class) and parameter shapes to the planner's
:class:`~distopt.distributed.plan.ParamSpec` s: per-parameter locality, ownership blocks,
cost and exact state bytes, all read from the recipe.

Per-parameter locality. A recipe's ``Chain.locality`` is the widest of its operators, but a
recipe may route parameters to different branches (Muon: Newton–Schulz for ndim >= 2, AdamW
for the rest). The locality of one parameter is found by walking the recipe built for its
param group with the parameter's *global* shape:

- an optimizer class may define ``param_locality(group, shape) -> Locality`` (classmethod);
  it wins;
- otherwise, for each operator of the chain: an operator with ``locality_for(shape)`` answers
  itself; a routing operator with ``_branch(param)`` (Muon's ``RouteByNdim``) is followed into
  the branch it picks for a meta tensor of that shape; any other operator gives its
  ``locality``.

An elementwise parameter is updated on flat 1-D slices. If the recipe would route a 1-D slice
differently from the whole tensor (a router keyed on ndim that picks another branch for the
flattened shape), the parameter is treated as ``TENSOR`` (owned whole) instead: never a
silently different update.

Optional hooks on the optimizer class (all classmethods taking the group and a shape):
``param_locality``; ``param_blocks(group, shape) -> list of boxes`` (independent ownership
units of a tensor/matrix param, each box ``((start, stop), ...)`` per dimension; default:
the whole param); ``param_cost(group, shape) -> float`` (default: ``numel`` for elementwise
and tensor, :func:`~distopt.distributed.plan.newton_schulz_cost` for matrix).

State bytes come from ``recipe.init`` on a meta tensor (no memory is allocated), so they are
the recipe's exact buffers (``step`` counters excluded, as in :func:`distopt.state_bytes`).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from distopt.core.chain import Chain
from distopt.core.operator import Locality, Operator
from distopt.core.shell import DistOptimizer
from distopt.distributed.plan import (
    Box, BlockSpec, ParamSpec, box_shape, elementwise_cost, newton_schulz_cost, numel,
)

OptimizerLike = DistOptimizer | type[DistOptimizer]


def group_defaults(optimizer: OptimizerLike, **overrides: Any) -> dict[str, Any]:
    """A full param group: the optimizer's hyperparameter defaults updated with ``overrides``."""
    spec = optimizer.hyperparameters()
    group = {k: h.default for k, h in spec.items()}
    if isinstance(optimizer, DistOptimizer):
        group.update(optimizer.defaults)
    group.update(overrides)
    return group


def _meta(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _leaves(op: Operator | Chain, shape: Sequence[int]) -> list[Operator]:
    if isinstance(op, Chain):
        return [leaf for o in op.operators for leaf in _leaves(o, shape)]
    if callable(getattr(op, "locality_for", None)):
        return [op]
    branch = getattr(op, "_branch", None)
    if callable(branch):
        try:
            chosen = branch(_meta(shape))
        except Exception:  # noqa: BLE001 - an unknown router: fall back to its declared locality
            return [op]
        if isinstance(chosen, (Operator, Chain)):
            return _leaves(chosen, shape)
    return [op]


def _op_locality(op: Operator, shape: Sequence[int]) -> Locality:
    fn = getattr(op, "locality_for", None)
    return Locality(fn(tuple(shape))) if callable(fn) else Locality(op.locality)


def recipe_locality(recipe: Chain, shape: Sequence[int]) -> Locality:
    """Locality of ``recipe`` for one param of ``shape`` (see the module docstring)."""
    leaves = _leaves(recipe, shape)
    loc = max((_op_locality(o, shape) for o in leaves), default=Locality.ELEMENTWISE)
    if loc is Locality.ELEMENTWISE and len(shape) != 1:
        flat = _leaves(recipe, (numel(shape),))
        if [type(o) for o in flat] != [type(o) for o in leaves] or any(
                _op_locality(o, (numel(shape),)) is not Locality.ELEMENTWISE for o in flat):
            return Locality.TENSOR
    return loc


def param_locality(optimizer: OptimizerLike, group: Mapping[str, Any], shape: Sequence[int]) -> Locality:
    """The locality distopt uses for one parameter (class hook ``param_locality`` or the recipe)."""
    hook = getattr(optimizer, "param_locality", None)
    if callable(hook):
        return Locality(hook(group, tuple(shape)))
    return recipe_locality(optimizer.recipe(group), shape)


def recipe_state_bytes(recipe: Chain, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> float:
    """Bytes of the buffers ``recipe.init`` creates for a param of ``shape`` (meta: no memory)."""
    try:
        state = recipe.init(_meta(shape, dtype))
    except Exception:  # noqa: BLE001 - an init that needs real values: assume two buffers
        return 2.0 * numel(shape) * torch.empty((), dtype=dtype).element_size()
    total = 0
    for key, v in state.items():
        if key != "step" and isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return float(total)


def default_cost(recipe: Chain | None, shape: Sequence[int], locality: Locality) -> float:
    if locality is Locality.MATRIX:
        steps = 5
        if recipe is not None:
            for op in _leaves(recipe, shape):
                if _op_locality(op, shape) is Locality.MATRIX and isinstance(getattr(op, "steps", None), int):
                    steps = op.steps
                    break
        return newton_schulz_cost(shape, steps)
    return elementwise_cost(shape)


def param_spec(optimizer: OptimizerLike, group: Mapping[str, Any], name: str, shape: Sequence[int],
               dtype: torch.dtype = torch.float32, group_index: int = 0) -> ParamSpec:
    """The planner's view of one parameter under ``optimizer`` with ``group``'s hyperparameters."""
    shape = tuple(int(x) for x in shape)
    recipe = optimizer.recipe(group)
    loc = param_locality(optimizer, group, shape)
    cost_hook = getattr(optimizer, "param_cost", None)

    def cost(s: Sequence[int]) -> float:
        return float(cost_hook(group, tuple(s))) if callable(cost_hook) else default_cost(recipe, s, loc)

    itemsize = torch.empty((), dtype=dtype).element_size()
    dname = str(dtype).replace("torch.", "")
    if loc is Locality.ELEMENTWISE:
        return ParamSpec(name, shape, loc, cost(shape), recipe_state_bytes(recipe, shape, dtype),
                         itemsize=itemsize, dtype=dname, group=group_index)
    blocks: tuple[BlockSpec, ...] = ()
    hook = getattr(optimizer, "param_blocks", None)
    boxes: list[Box] | None = hook(group, shape) if callable(hook) else None
    if boxes and len(boxes) > 1:
        blocks = tuple(BlockSpec(tuple(tuple(map(int, d)) for d in b), cost(box_shape(b)),
                                 recipe_state_bytes(recipe, box_shape(b), dtype)) for b in boxes)
    else:
        blocks = (BlockSpec(None, cost(shape), recipe_state_bytes(recipe, shape, dtype)),)
    return ParamSpec(name, shape, loc, sum(b.cost for b in blocks), sum(b.state_bytes for b in blocks),
                     blocks, itemsize, dname, group_index)


def optimizer_specs(optimizer: DistOptimizer, names: Mapping[int, str] | None = None,
                    shapes: Mapping[int, Sequence[int]] | None = None) -> list[ParamSpec]:
    """Specs of every param of a built optimizer, in ``param_groups`` order. ``names``/``shapes``
    map ``id(param)`` to its name / *global* shape (default: ``"<group>.<index>"`` and
    ``param.shape``)."""
    out = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            name = (names or {}).get(id(p), f"{gi}.{pi}")
            shape = (shapes or {}).get(id(p), tuple(p.shape))
            out.append(param_spec(optimizer, group, name, shape, p.dtype, gi))
    return out


def recipe_specs(optimizer: OptimizerLike, named_shapes: Iterable[tuple[str, Sequence[int]]],
                 group_of: Callable[[str, tuple[int, ...]], Mapping[str, Any]] | None = None,
                 dtype: torch.dtype = torch.float32) -> list[ParamSpec]:
    """Specs for a model given only as (name, shape) pairs: ``group_of(name, shape)`` returns
    hyperparameter overrides of that param's group (e.g. ``{"use_muon": False}`` for embeddings)."""
    out = []
    for name, shape in named_shapes:
        overrides = dict(group_of(name, tuple(shape))) if group_of else {}
        out.append(param_spec(optimizer, group_defaults(optimizer, **overrides), name, shape, dtype,
                              1 if overrides else 0))
    return out
