"""Recipes by family. Every module under a family package is imported here, so a new
optimizer only needs its own file with a ``@register``-ed class."""
from __future__ import annotations

import importlib
import pkgutil

from distopt.core.registry import FAMILIES


def _import_all() -> None:
    for family in FAMILIES:
        package = importlib.import_module(f"{__name__}.{family}")
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{package.__name__}.{info.name}")


_import_all()
