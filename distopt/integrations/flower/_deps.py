"""Optional dependencies of the Flower integration, imported with one clear error."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

INSTALL_HINT = 'pip install "distopt[fl]"'


def require(module: str, extra: str = "fl") -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"distopt's federated integration needs `{module}`; install it with: pip install \"distopt[{extra}]\""
        ) from exc


def option(cls: type[T], value: Any, name: str) -> T | None:
    """A client option from what a user may pass: None/False (off), True (defaults), a dict of
    fields, or an instance of ``cls``."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"{name} must be None, True, a dict or a {cls.__name__}, got {type(value).__name__}")
