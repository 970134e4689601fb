"""Benchmarks behind the ``distopt`` command line.

- :mod:`distopt.bench.catalogue`: the registry as a table (stages, locality, state bytes/param).
- :mod:`distopt.bench.workloads` (+ ``workloads_vision``, ``workloads_lm``), :mod:`~distopt.bench.protocol`,
  :mod:`~distopt.bench.runner`, :mod:`~distopt.bench.stats`, :mod:`~distopt.bench.report`: the survey's
  evaluation made rigorous (equal tuning budgets, seeds, bootstrap CIs, steps/time to target, profiles).
- :mod:`distopt.bench.ablation`: the P × Φ operator ablation.
- scenario benchmarks: ``second_order_step``, ``zo_memory``, ``dp``, ``fed``, ``distopt.distributed.bench``.
- :mod:`distopt.bench.step_time`: ``step()`` time side by side with ``torch.optim``.

Only torch is required by the core; the suite's extras (scikit-learn, matplotlib, rich, tqdm) are
imported lazily through :func:`require` / :func:`optional`.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = 'pip install "distopt[bench]"'


def require(module: str) -> ModuleType:
    """Import ``module`` or raise an ImportError telling how to install the bench extras."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"distopt bench needs `{module}`; install the extras with: {INSTALL_HINT}") from exc


def optional(module: str) -> ModuleType | None:
    """Import ``module`` if it is installed, else ``None`` (for nice-to-have output)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def pyplot() -> ModuleType | None:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or ``None`` without matplotlib."""
    mpl = optional("matplotlib")
    if mpl is None:
        return None
    mpl.use("Agg")
    return importlib.import_module("matplotlib.pyplot")
