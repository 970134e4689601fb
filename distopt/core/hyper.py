"""Hyperparameter declarations and validation.

Each optimizer declares its hyperparameters as ``name -> Hyper(default, rule)``; names
follow ``torch.optim`` (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``,
``nesterov``, ...). Bad values raise ``ValueError`` naming the argument and the allowed
range; unknown names raise ``TypeError`` listing the allowed ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Rule:
    """A predicate with the human text of what it allows."""

    check: Check
    allowed: str


def _real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ge(low: float) -> Rule:
    return Rule(lambda x: _real(x) and x >= low, f">= {low}")


def gt(low: float) -> Rule:
    return Rule(lambda x: _real(x) and x > low, f"> {low}")


def interval(low: float, high: float, closed_high: bool = False) -> Rule:
    right = "]" if closed_high else ")"
    if closed_high:
        return Rule(lambda x: _real(x) and low <= x <= high, f"in [{low}, {high}{right}")
    return Rule(lambda x: _real(x) and low <= x < high, f"in [{low}, {high}{right}")


def betas(n: int = 2) -> Rule:
    return Rule(
        lambda b: isinstance(b, (tuple, list)) and len(b) == n and all(_real(x) and 0.0 <= x < 1.0 for x in b),
        f"a tuple of {n} floats, each in [0, 1)",
    )


def one_of(*values: Any) -> Rule:
    return Rule(lambda x: x in values, "one of " + ", ".join(repr(v) for v in values))


def integer(low: int = 1) -> Rule:
    return Rule(lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low, f"an integer >= {low}")


FLAG = Rule(lambda x: isinstance(x, bool), "True or False")
OPTIONAL_FLAG = Rule(lambda x: x is None or isinstance(x, bool), "None, True or False")
OPTIONAL_POSITIVE = Rule(lambda x: x is None or (_real(x) and x > 0), "None or > 0")
ANY = Rule(lambda x: True, "anything")


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default and the rule its values must satisfy."""

    default: Any
    rule: Rule = ANY


def validate(optimizer: str, spec: Mapping[str, Hyper], values: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for unknown names and ``ValueError`` for values outside their rule."""
    unknown = sorted(set(values) - set(spec) - {"params"})
    if unknown:
        raise TypeError(
            f"{optimizer}: unknown hyperparameter {unknown[0]!r}; allowed: {', '.join(sorted(spec))}"
        )
    for name, value in values.items():
        if name in spec and not spec[name].rule.check(value):
            raise ValueError(f"{optimizer}: invalid {name}={value!r}; {name} must be {spec[name].rule.allowed}")


# The hyperparameters most recipes share, spelled once.
LR = Hyper(1e-3, ge(0.0))
EPS = Hyper(1e-8, ge(0.0))
WEIGHT_DECAY = Hyper(0.0, ge(0.0))
FOREACH = Hyper(None, OPTIONAL_FLAG)
MAXIMIZE = Hyper(False, FLAG)
COMMON = {"foreach": FOREACH, "maximize": MAXIMIZE}
