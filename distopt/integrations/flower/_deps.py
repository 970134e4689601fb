"""Optional dependencies of the Flower integration, imported with one clear error."""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "distopt[fl]"'


def require(module: str, extra: str = "fl") -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"distopt's federated integration needs `{module}`; install it with: pip install \"distopt[{extra}]\""
        ) from exc
