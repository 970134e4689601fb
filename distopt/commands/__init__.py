"""Command-line plugins. Every module here defines ``add_commands(top, bench)``, called with the
``distopt`` sub-parsers and the ``distopt bench`` sub-parsers, so a scenario adds its own
commands (``distopt bench zo``, ``distopt fed simulate``, ...) in its own file. Modules must
import heavy dependencies inside their command functions, not at import time."""
from __future__ import annotations

import argparse
import importlib
import pkgutil


def add_all(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    """Let every plugin module add its parsers."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.add_commands(top, bench)
