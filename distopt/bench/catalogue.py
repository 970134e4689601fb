"""The catalogue as rows: name, family, stages, locality, measured state bytes/param, reference.

State bytes are *measured*: the optimizer is built on a float32 128x96 matrix and a 96-vector
(above adamw8bit's 4096-element threshold for quantized moments),
given random gradients, stepped twice, and every tensor in ``optimizer.state`` except the scalar
``step`` counter is summed and divided by the number of parameters.
"""
from __future__ import annotations

from typing import Any, TextIO

import torch

import distopt
from distopt.bench.table import render_table

COLUMNS = ("name", "family", "stages", "locality", "state B/param", "reference")


def _probe_params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(128, 96, generator=gen)), torch.nn.Parameter(torch.randn(96, generator=gen))]


def _step(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], gen: torch.Generator) -> None:
    """One step on a quartic loss, driven the way the optimizer's ``closure_kind`` asks."""
    targets = [torch.randn(p.shape, generator=gen) for p in params]

    def loss_fn() -> torch.Tensor:
        return sum(((p - t) ** 4).sum() for p, t in zip(params, targets))  # type: ignore[return-value]

    kind = getattr(type(opt), "closure_kind", "backward")
    if kind == "forward":  # zeroth order: the closure is only ever evaluated
        opt.step(loss_fn)
        return

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn()
        loss.backward(create_graph=kind == "create_graph")
        return loss

    opt.step(closure)


def state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per parameter after two steps (excluding ``step``)."""
    params = _probe_params()
    opt = distopt.create(name, params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        _step(opt, params, gen)
    return distopt.state_bytes_per_param(opt)


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
