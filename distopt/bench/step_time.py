"""``step()`` time of distopt optimizers side by side with ``torch.optim``.

For each optimizer, every candidate (distopt; torch foreach; torch fused where torch supports it
on the device) gets its own copy of the same tensors with preset gradients. Candidates are
interleaved within each repeat so drift (clock, cache, thermal) hits them alike; medians are
reported. The torch counterpart is the class named by ``cls.reference`` when it lives in
``torch.optim``; other optimizers are timed next to torch's foreach AdamW.
"""
from __future__ import annotations

import ast
import inspect
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

import torch

import distopt
from distopt.bench.table import render_table

EXTRA: dict[str, dict[str, Any]] = {"sgd": {"momentum": 0.9}}  # make SGD keep state, as in practice
_TORCH_ONLY = {"params", "foreach", "fused", "maximize", "capturable", "differentiable"}
COLUMNS = ("optimizer", "distopt ms", "torch", "foreach ms", "fused ms", "vs foreach", "vs fused")


def default_shapes(size: int = 1024) -> list[tuple[int, ...]]:
    """A small transformer's worth: 8 (N,N) + 8 (N,) + 4 (4N, N/4) tensors."""
    return [(size, size)] * 8 + [(size,)] * 8 + [(4 * size, max(size // 4, 1))] * 4


def _tensors(shapes: list[tuple[int, ...]], device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).to(device).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device)
        params.append(p)
    return params


def torch_counterpart(name: str) -> tuple[type[torch.optim.Optimizer], dict[str, Any]] | None:
    """The ``torch.optim`` class (and fixed keyword arguments) named by the optimizer's ``reference``,
    e.g. ``"torch.optim.NAdam(decoupled_weight_decay=True)"``; ``None`` if it is not torch.optim."""
    match = re.match(r"torch\.optim\.(\w+)(\((.*?)\))?", distopt.get(name).reference or "")
    cls = getattr(torch.optim, match.group(1), None) if match else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        return None
    try:
        call = ast.parse(f"f({match.group(3) or ''})", mode="eval").body
        return cls, {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
    except (SyntaxError, ValueError):
        return None


def _hparams(name: str) -> dict[str, Any]:
    defaults = distopt.get(name).hyperparameters()
    return {k: h.default for k, h in defaults.items() if k not in ("foreach", "maximize")} | EXTRA.get(name, {})


def _torch_factory(cls: type, hparams: dict[str, Any], mode: str) -> Callable[[list[torch.Tensor]], Any]:
    accepted = set(inspect.signature(cls.__init__).parameters) - _TORCH_ONLY
    kwargs = {k: v for k, v in hparams.items() if k in accepted} | {mode: True}
    if "foreach" in inspect.signature(cls.__init__).parameters and mode == "fused":
        kwargs["foreach"] = False
    return lambda params: cls(params, **kwargs)


def _supported(factory: Callable[[list[torch.Tensor]], Any], device: str) -> bool:
    p = torch.zeros(4, device=device, requires_grad=True)
    p.grad = torch.ones(4, device=device)
    try:
        factory([p]).step()
        return True
    except Exception:  # noqa: BLE001 - unsupported mode/device/hyperparameters
        return False


@dataclass
class Candidate:
    label: str
    optimizer: Any


def candidates(name: str, shapes: list[tuple[int, ...]], device: str) -> tuple[list[Candidate], str]:
    """distopt plus the torch counterparts (foreach, fused) that work; returns them and the torch label."""
    hparams = _hparams(name)
    counterpart = torch_counterpart(name)
    if counterpart is None:  # timed alone, next to torch's foreach AdamW as the yardstick
        cls, hparams_t, modes = torch.optim.AdamW, {}, ("foreach",)
        torch_label = "AdamW (no counterpart)"
    else:
        (cls, fixed), modes = counterpart, ("foreach", "fused")
        hparams_t, torch_label = hparams | fixed, cls.__name__ + "".join(f" {k}={v}" for k, v in fixed.items())
    out = [Candidate("distopt", distopt.create(name, _tensors(shapes, device), foreach=True, **EXTRA.get(name, {})))]
    if "fused" in distopt.get(name).hyperparameters():
        fused = _distopt_fused(name, device)
        if _supported(fused, device):
            out.append(Candidate("distopt-fused", fused(_tensors(shapes, device))))
    for mode in modes:
        factory = _torch_factory(cls, hparams_t, mode)
        if _supported(factory, device):
            out.append(Candidate(mode, factory(_tensors(shapes, device))))
    return out, torch_label


def _distopt_fused(name: str, device: str) -> Callable[[list[torch.Tensor]], Any]:
    return lambda params: distopt.create(name, params, fused=True, **EXTRA.get(name, {}))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_candidates(cands: list[Candidate], repeats: int, device: str, warmup: int = 3) -> dict[str, float]:
    """Median ms per ``step()`` of each candidate, interleaved across repeats."""
    for _ in range(warmup):
        for c in cands:
            c.optimizer.step()
    times: dict[str, list[float]] = {c.label: [] for c in cands}
    for _ in range(repeats):
        for c in cands:
            _sync(device)
            t0 = time.perf_counter()
            c.optimizer.step()
            _sync(device)
            times[c.label].append(1e3 * (time.perf_counter() - t0))
    return {label: statistics.median(ts) for label, ts in times.items()}


def _row(name: str, torch_label: str, ms: dict[str, float], error: str | None = None) -> dict[str, Any]:
    ours = {"foreach": ms.get("distopt"), "fused": ms.get("distopt-fused", ms.get("distopt"))}
    ratio = {m: ms[m] / ours[m] if m in ms and ours[m] else None for m in ("foreach", "fused")}
    return {"optimizer": name, "torch": torch_label, "distopt_ms": ms.get("distopt"),
            "foreach_ms": ms.get("foreach"), "fused_ms": ms.get("fused"),
            "ratio_foreach": ratio["foreach"], "ratio_fused": ratio["fused"], "error": error}


def bench_step(names: list[str], size: int = 1024, repeats: int = 20, device: str = "cpu",
               progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per optimizer: medians in ms and throughput ratios distopt/torch (= t_torch / t_distopt)."""
    shapes = default_shapes(size)
    rows = []
    for name in names:
        if progress:
            progress(name)
        try:
            cands, torch_label = candidates(name, shapes, device)
            rows.append(_row(name, torch_label, time_candidates(cands, repeats, device)))
            del cands
        except Exception as exc:  # noqa: BLE001 - e.g. an optimizer that needs a closure
            rows.append(_row(name, "-", {}, f"{type(exc).__name__}: {exc}"))
    return rows


def print_step_table(rows: list[dict[str, Any]], title: str, file: TextIO | None = None, plain: bool = False) -> None:
    fmt = lambda v, spec: None if v is None else format(v, spec)  # noqa: E731
    table = [(r["optimizer"], fmt(r["distopt_ms"], ".2f"), r["torch"], fmt(r["foreach_ms"], ".2f"),
              fmt(r["fused_ms"], ".2f"), fmt(r["ratio_foreach"], ".2f"), fmt(r["ratio_fused"], ".2f")) for r in rows]
    render_table(COLUMNS, table, title=title, file=file, plain=plain)


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Plain ``ratio`` lines (throughput distopt / torch; > 1 means distopt is faster)."""
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append(f"ratio {r['optimizer']}: not timed ({r['error']})")
            continue
        parts = [f"ratio {r['optimizer']}: distopt/torch-foreach {r['torch']} = "
                 + ("n/a" if r["ratio_foreach"] is None else f"{r['ratio_foreach']:.2f}x")]
        if r["ratio_fused"] is not None:
            parts.append(f"distopt/torch-fused = {r['ratio_fused']:.2f}x")
        lines.append(", ".join(parts))
    return lines
