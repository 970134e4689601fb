"""Lookahead (Zhang et al., "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019)
around any registered recipe optimizer:

    distopt.create("lookahead", params, base="adamw", k=5, alpha=0.5, lr=1e-3, weight_decay=0.1)

The recipe is the base recipe followed by a P operator that, every ``k`` steps, sets
``slow <- slow + α (fast - slow)`` and ``fast <- slow`` (``slow_params`` start at p_0). The
hyperparameters are the base's plus ``base``, ``k`` and ``alpha``.
"""
from __future__ import annotations

import functools
from inspect import unwrap
from typing import Any, Callable, Mapping

import torch

from distopt.accumulators.averaging import LookaheadAverage
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import integer, interval, one_of
from distopt.core.registry import available, get

DEFAULT_BASE = "adamw"


class _class_or_instance_method:
    """Bind to the instance when there is one, else to the class (``Lookahead.hyperparameters()``
    describes the default base; ``optimizer.hyperparameters()`` the chosen one)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        return functools.partial(self.fn, owner if obj is None else obj)


def _base_class(base: Any) -> type[DistOptimizer]:
    if not isinstance(base, str):
        raise ValueError(f"lookahead: invalid base={base!r}; base must be the name of a registered optimizer")
    if base.lower() == Lookahead.name:
        raise ValueError("lookahead: invalid base='lookahead'; base must be another registered optimizer")
    if base.lower() not in available():
        raise ValueError(f"lookahead: invalid base={base!r}; base must be one of {', '.join(available())}")
    cls = get(base)
    # torch.optim.Optimizer wraps a class's step() in a profiling hook on first use: unwrap it
    if unwrap(cls.step) is not unwrap(DistOptimizer.step) or cls._step_group is not DistOptimizer._step_group:
        raise ValueError(f"lookahead: invalid base={base!r}; it runs its own step() and cannot be wrapped")
    clash = sorted({"base", "k", "alpha"} & set(cls.hyperparameters()))
    if clash:
        raise ValueError(f"lookahead: invalid base={base!r}; its hyperparameter {clash[0]!r} clashes with lookahead's")
    return cls


@register
class Lookahead(DistOptimizer):
    name = "lookahead"
    family = "first_order"
    reference = "pytorch_optimizer.Lookahead around torch.optim.AdamW / torch.optim.SGD"
    _base_name: str = DEFAULT_BASE

    def __init__(self, params: Any, base: str = DEFAULT_BASE, **hparams: Any) -> None:
        self._base_name = _base_class(base).name
        super().__init__(params, base=self._base_name, **hparams)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # run the base's own constructor checks (e.g. SGD's nesterov rule) on a stand-in tensor
        group = self.param_groups[-1]
        base_cls = get(group["base"])
        base_cls([torch.zeros(1)], **{k: group[k] for k in base_cls.hyperparameters() if k in group})

    @_class_or_instance_method
    def hyperparameters(self_or_cls: Any) -> dict[str, Hyper]:  # type: ignore[override]
        name = self_or_cls._base_name
        return {
            **get(name).hyperparameters(),
            "base": Hyper(name, one_of(name)),
            "k": Hyper(5, integer(1)),
            "alpha": Hyper(0.5, interval(0.0, 1.0, closed_high=True)),
        }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(get(group["base"]).recipe(group), LookaheadAverage(group["k"], group["alpha"]))
