"""The catalogue: every optimizer class registers itself under a lowercase name and a family."""
from __future__ import annotations

from typing import Any, Iterable

from distopt.core.shell import DistOptimizer

FAMILIES = ("first_order", "second_order", "zeroth_order", "memory_efficient")
_REGISTRY: dict[str, type[DistOptimizer]] = {}


def register(cls: type[DistOptimizer]) -> type[DistOptimizer]:
    """Class decorator: add ``cls`` to the catalogue under ``cls.name``."""
    if cls.family not in FAMILIES:
        raise ValueError(f"register: family of {cls.__name__} must be one of {FAMILIES}, got {cls.family!r}")
    if cls.name != cls.name.lower() or not cls.name:
        raise ValueError(f"register: name of {cls.__name__} must be a non-empty lowercase string")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"register: {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[DistOptimizer]:
    """The optimizer class registered as ``name`` (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {type(name).__name__}")
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key]


def create(name: str, params: Iterable[Any], **hparams: Any) -> DistOptimizer:
    """Build the optimizer registered as ``name``: ``create("adamw", model.parameters(), lr=3e-4)``."""
    return get(name)(params, **hparams)


def available(family: str | None = None) -> list[str]:
    """Sorted names in the catalogue, optionally of one family."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"available: family must be one of {', '.join(FAMILIES)} or None, got {family!r}")
    return sorted(n for n, c in _REGISTRY.items() if family is None or c.family == family)
