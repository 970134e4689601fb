"""The catalogue as rows: name, family, stages, locality, measured state bytes/param, reference.

State bytes are *measured*: the optimizer is built on a float32 64x48 matrix and a 48-vector,
given random gradients, stepped twice, and every tensor in ``optimizer.state`` except the scalar
``step`` counter is summed and divided by the number of parameters.
"""
from __future__ import annotations

from typing import Any, Iterator, TextIO

import torch

import distopt
from distopt.bench.table import render_table

COLUMNS = ("name", "family", "stages", "locality", "state B/param", "reference")


def _probe_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 48, generator=gen)), torch.nn.Parameter(torch.randn(48, generator=gen))]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)

    def closure() -> torch.Tensor:  # for optimizers that re-evaluate the loss (zeroth order, line search)
        loss = sum((p * p).sum() for p in params)
        if torch.is_grad_enabled() and loss.requires_grad:
            opt.zero_grad()
            loss.backward()
        return loss.detach()

    try:
        opt.step()
    except Exception:  # noqa: BLE001 - some optimizers need a closure
        opt.step(closure)


def state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per parameter after two steps (excluding ``step``)."""
    params = _probe_params()
    opt = distopt.create(name, params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _step(opt, params, gen)
    seen: dict[int, int] = {}
    for state in opt.state.values():
        for key, value in state.items():
            if key == "step":
                continue
            for t in _tensors(value):
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values()) / sum(p.numel() for p in params)


def describe(name: str) -> dict[str, Any]:
    """One catalogue row (a dict keyed by :data:`COLUMNS` names)."""
    cls = distopt.get(name)
    row: dict[str, Any] = {"name": name, "family": cls.family, "reference": cls.reference}
    try:
        group = distopt.create(name, _probe_params()).param_groups[0]
        recipe = cls.recipe(group)
        row.update(stages=recipe.stages, locality=recipe.locality.name.lower())
    except Exception as exc:  # noqa: BLE001 - a broken entry must not hide the others
        row.update(stages="?", locality="?", error=f"{type(exc).__name__}: {exc}")
    try:
        row["state_bytes_per_param"] = state_bytes_per_param(name)
    except Exception as exc:  # noqa: BLE001
        row.update(state_bytes_per_param=None, error=f"{type(exc).__name__}: {exc}")
    return row


def catalogue(family: str | None = None) -> list[dict[str, Any]]:
    """Rows for every registered optimizer (of ``family`` if given), sorted by family then name."""
    rows = [describe(name) for name in distopt.available(family)]
    return sorted(rows, key=lambda r: (r["family"], r["name"]))


def print_catalogue(rows: list[dict[str, Any]], file: TextIO | None = None, plain: bool = False) -> None:
    """Print the rows as a table (rich if installed)."""
    table = [
        (r["name"], r["family"], r["stages"], r["locality"], _bytes(r["state_bytes_per_param"]), r["reference"])
        for r in rows
    ]
    render_table(COLUMNS, table, title=f"distopt catalogue ({len(rows)} optimizers)", file=file, plain=plain)


def _bytes(value: float | None) -> str | float | None:
    return None if value is None else float(f"{value:.2f}")
