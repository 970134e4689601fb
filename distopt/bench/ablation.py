"""``distopt bench ablation``: a factorial run over the preconditioner P and the accumulator Φ.

The survey writes every optimizer as E → T → Φ → P. Here Φ and P are varied independently, built
from distopt's own operators with :func:`distopt.chain` / :class:`distopt.ChainOptimizer`:

=================  ==============================================================================
P                  operators (statistics always from the raw gradient g; P acts on Φ's output u)
=================  ==============================================================================
identity           ``ApplyLR``                                           (SGD)
diagonal           ``SecondMoment(0.999)`` … ``RootMomentPreconditioner`` (Adam's v)
factored           ``FactoredSecondMoment`` … ``FactoredRootPreconditioner`` (Adafactor's row/col v)
kronecker          Shampoo's ``KroneckerFactors`` … ``KroneckerInverseRoots``,
                   ``KroneckerPrecondition`` (β2 = 0.999, Adam grafting; from ``distopt.get("shampoo")``)
orthogonalized     ``NewtonSchulzOrthogonalize`` + ``ApplyShapeScaledLR("match_rms_adamw")`` (Muon's P)
=================  ==============================================================================

Φ ∈ {none: u = g; ema: ``FirstMoment(0.9)``, u = m; nesterov: ``NesterovFirstMoment(0.9)``,
u = β m + (1 - β) g}. With P = orthogonalized, Φ = nesterov is Muon; with P = diagonal, Φ = ema
is Adam (no weight decay anywhere).

P is applied to the hidden matrices of the LM (attention and MLP weights); the embedding, the
head and the RMSNorm gains use one fixed AdamW chain (lr 2e-3) in every cell, so the cells differ
only in (P, Φ). Each cell tunes its own lr on a small grid around its P's base lr (tuning
replicate, equal budget), then runs ``seeds`` evaluation seeds at the tuned lr. Results: final
validation / test loss with bootstrap CIs, steps-to-target (target: the (diagonal, ema) = Adam
cell's median), a table, ``ablation.md``, ``ablation.png`` (heat map) and ``ablation.jsonl``.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

import distopt
from distopt.accumulators.factored import FactoredSecondMoment
from distopt.accumulators.moments import FirstMoment, SecondMoment
from distopt.accumulators.nesterov_first_moment import NesterovFirstMoment
from distopt.bench import pyplot, stats
from distopt.bench.table import render_table
from distopt.core.operator import Operator, Stage
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.preconditioners.factored import FactoredRootPreconditioner
from distopt.preconditioners.orthogonal import ApplyShapeScaledLR, NewtonSchulzOrthogonalize

try:  # written in parallel by another helper: the Kronecker cell is skipped while it is missing
    from distopt.optimizers.second_order import shampoo as _shampoo
except ImportError:  # pragma: no cover
    _shampoo = None

P_CHOICES = ("identity", "diagonal", "factored", "kronecker", "orthogonalized")
PHI_CHOICES = ("none", "ema", "nesterov")
BASE_LR = {"identity": 0.1, "diagonal": 2e-3, "factored": 2e-3, "kronecker": 2e-3, "orthogonalized": 1e-2}
REST_LR = 2e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def cell_name(p: str, phi: str) -> str:
    return f"ablation/P={p}/Phi={phi}"


def parse(name: str) -> tuple[str, str]:
    parts = dict(part.split("=", 1) for part in name.split("/")[1:])
    p, phi = parts.get("P", ""), parts.get("Phi", "")
    if p not in P_CHOICES or phi not in PHI_CHOICES:
        raise ValueError(f"ablation: bad cell {name!r}; P in {P_CHOICES}, Phi in {PHI_CHOICES}")
    return p, phi


def kronecker_available() -> bool:
    return _shampoo is not None and "shampoo" in distopt.available()


def _phi_ops(phi: str) -> list[Operator]:
    return {"none": [], "ema": [FirstMoment(BETA1)], "nesterov": [NesterovFirstMoment(BETA1)]}[phi]


def _kronecker(group: Mapping[str, Any]) -> tuple[list[Operator], list[Operator]]:
    """Shampoo's operators with β1 = 0 and no momentum: (statistics ops, preconditioning ops)."""
    cls = distopt.get("shampoo")
    g = {k: h.default for k, h in cls.hyperparameters().items()}
    g.update(lr=group["lr"], betas=(0.0, BETA2), momentum=0.0, weight_decay=0.0)
    ops = list(cls.recipe(g))
    pre = [op for op in ops if op.stage < Stage.P and not isinstance(op, FirstMoment)]
    post = [op for op in ops if op.stage == Stage.P]
    return pre, post


def cell_chain(p: str, phi: str, group: Mapping[str, Any]) -> distopt.Chain:
    """The (P, Φ) recipe for the hidden matrices."""
    beta1 = BETA1 if phi != "none" else 0.0
    if p == "identity":
        return distopt.chain(*_phi_ops(phi), ApplyLR())
    if p == "diagonal":
        return distopt.chain(SecondMoment(BETA2), *_phi_ops(phi), RootMomentPreconditioner(EPS, beta1, BETA2), ApplyLR())
    if p == "factored":
        return distopt.chain(FactoredSecondMoment(), *_phi_ops(phi), FactoredRootPreconditioner(), ApplyLR())
    if p == "kronecker":
        if not kronecker_available():
            raise RuntimeError("ablation: P=kronecker needs the 'shampoo' optimizer, which is not registered")
        pre, post = _kronecker(group)
        return distopt.chain(*pre, *_phi_ops(phi), *post)
    dtype = torch.bfloat16 if any(q.is_cuda for q in group["params"]) else None
    return distopt.chain(*_phi_ops(phi), NewtonSchulzOrthogonalize(dtype=dtype), ApplyShapeScaledLR(None, "match_rms_adamw"))


def _rest_chain() -> distopt.Chain:
    return distopt.chain(SecondMoment(BETA2), FirstMoment(BETA1), RootMomentPreconditioner(EPS, BETA1, BETA2), ApplyLR())


def make_optimizer(name: str, model: nn.Module, lr: float, hparams: dict[str, Any]) -> torch.optim.Optimizer:
    """A ChainOptimizer: the cell's chain on hidden matrices, AdamW-without-decay on the rest."""
    from distopt.bench.runner import _is_io

    p, phi = parse(name)
    named = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
    hidden = [q for n, q in named if q.ndim == 2 and not _is_io(n)]
    rest = [q for n, q in named if not (q.ndim == 2 and not _is_io(n))]
    groups = [{"params": hidden, "role": "hidden", "lr": lr}, {"params": rest, "role": "rest", "lr": REST_LR}]

    def recipe(group: Mapping[str, Any]) -> distopt.Chain:
        return cell_chain(p, phi, group) if group["role"] == "hidden" else _rest_chain()

    return distopt.ChainOptimizer([g for g in groups if g["params"]], recipe, lr=lr, role="hidden")


# --------------------------------------------------------------------------------------------- suite


def run(workload: str = "llama_char", seeds: int = 1, grid: tuple[float, ...] = (0.0625, 0.25, 1.0, 4.0, 16.0),
        quick: bool = False, budget_scale: float = 1.0, cache: Any = None, jobs: int = 1, threads: int = 1,
        progress: bool = True, device: str = "cpu", limit: int | None = None,
        cells: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Tune each cell's lr on ``grid`` (tuning replicate), then run ``seeds`` seeds at the tuned lr.
    ``cells`` restricts the factorial to some (P, Φ) pairs."""
    from distopt.bench.runner import close_pool

    try:
        return _run(workload, seeds, grid, quick, budget_scale, cache, jobs, threads, progress, device, limit, cells)
    finally:
        close_pool()


def _run(workload: str, seeds: int, grid: tuple[float, ...], quick: bool, budget_scale: float, cache: Any,
         jobs: int, threads: int, progress: bool, device: str, limit: int | None,
         cells: list[tuple[str, str]] | None) -> dict[str, Any]:
    from distopt.bench.protocol import TUNING_REPLICATE, replicate
    from distopt.bench.runner import Cache, base_workload, cache_key, execute, make_spec, select_lr

    cache = cache if cache is not None else Cache(None)
    notes: list[str] = []
    wl = base_workload(workload, device, quick)
    budget = max(1, round(wl.budget * budget_scale))
    grid = (1.0,) if quick else grid
    cells = cells or [(p, phi) for p in P_CHOICES for phi in PHI_CHOICES]
    if not kronecker_available() and any(c[0] == "kronecker" for c in cells):
        notes.append("P=kronecker skipped: 'shampoo' is not registered")
        cells = [c for c in cells if c[0] != "kronecker"]

    def spec(p: str, phi: str, lr: float, rep: int) -> Any:
        init, data = replicate(rep)
        return make_spec(cell_name(p, phi), workload, lr, init, data, budget, device=device, quick=quick, hparams={})

    tune = {c: [spec(*c, BASE_LR[c[0]] * f, TUNING_REPLICATE) for f in grid] for c in cells}
    recs, c1 = execute([s for ss in tune.values() for s in ss], cache, jobs, threads, progress, "ablation tuning", limit)
    by_key = {r["key"]: r for r in recs}
    tuned = {}
    for c, ss in tune.items():
        rs = [by_key[k] for k in map(cache_key, ss) if k in by_key]
        if len(rs) == len(ss):
            tuned[c] = select_lr(rs, higher_is_better=False)
    ev = {c: [spec(*c, lr, r) for r in range(seeds)] for c, lr in tuned.items()}
    recs2, c2 = execute([s for ss in ev.values() for s in ss], cache, jobs, threads, progress, "ablation eval")
    by_key.update({r["key"]: r for r in recs2})
    result: dict[str, Any] = {"workload": workload, "budget": budget, "grid": list(grid), "seeds": seeds,
                              "notes": notes, "counts": {"tuning": c1, "evaluation": c2}, "cells": {}}
    for c in cells:
        result["cells"][f"{c[0]}|{c[1]}"] = {
            "P": c[0], "Phi": c[1], "tuned_lr": tuned.get(c),
            "tuning": [by_key[k] for k in map(cache_key, tune[c]) if k in by_key],
            "eval": [by_key[k] for k in map(cache_key, ev.get(c, [])) if k in by_key]}
    _summarise(result, wl.failure_value)
    return result


def _summarise(result: dict[str, Any], failure: float) -> None:
    cells = result["cells"]
    ref = cells.get("diagonal|ema", {}).get("eval", [])
    vals = [r["metrics"].get("final_val") for r in ref if not r.get("error")]
    target = stats.median([failure if v is None else v for v in vals]) if vals else None
    result["target"] = target
    for cell in cells.values():
        ev = cell["eval"]
        test = [failure if r["metrics"].get("final_test") is None else r["metrics"]["final_test"] for r in ev]
        val = [failure if r["metrics"].get("final_val") is None else r["metrics"]["final_val"] for r in ev]
        cell["test_mean"] = statistics.fmean(test) if test else math.nan
        cell["test_ci"] = list(stats.bootstrap_ci(test)) if test else [math.nan, math.nan]
        cell["val_median"] = stats.median(val) if val else math.nan
        cell["diverged"] = sum(bool(r["metrics"].get("diverged")) for r in ev)
        cell["errors"] = sorted({r["error"] for r in cell["tuning"] + ev if r.get("error")})
        steps = [stats.steps_to_target(r["curves"].get("step", []), r["curves"].get("val", []), target, False)
                 if target is not None and not r.get("error") else math.inf for r in ev]
        cell["steps_to_target"] = stats.median(steps) if steps else math.nan
        cell["state_bpp"] = statistics.median([r["metrics"]["state_bytes_per_param"] for r in ev if not r.get("error")]
                                              or [math.nan])


def _fmt(v: float, spec: str = ".4f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else ("∞" if math.isinf(v) else format(v, spec))


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = ["P \\ Φ"] + [f"{phi}" for phi in PHI_CHOICES]
    rows = []
    for p in P_CHOICES:
        cells = []
        for phi in PHI_CHOICES:
            c = result["cells"].get(f"{p}|{phi}")
            if c is None:
                cells.append("skipped")
                continue
            lrs = sorted(r["config"]["lr"] for r in c["tuning"])
            edge = len(lrs) > 1 and c["tuned_lr"] in (lrs[0], lrs[-1])
            lr = "-" if c["tuned_lr"] is None else f"{c['tuned_lr']:g}" + ("*" if edge else "")
            ci = c["test_ci"]
            text = f"{_fmt(c['test_mean'])}" + (f" [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci[0] != ci[1] else "")
            text += f" lr={lr} steps={_fmt(c['steps_to_target'], '.0f')}"
            if c["diverged"]:
                text += f" div={c['diverged']}"
            if c["errors"]:
                text += " (error)"
            cells.append(text)
        rows.append((p, *cells))
    return cols, rows


def write(result: dict[str, Any], out: Path, plain: bool = False) -> list[Path]:
    """Print the table; write ablation.jsonl, ablation.md and ablation.png."""
    from distopt.bench.report import _clean

    cols, rows = table_rows(result)
    title = (f"operator ablation on {result['workload']} (B={result['budget']}): test loss (mean [95% CI]) at each "
             f"cell's tuned lr (* = edge of the grid); steps to the Adam cell's median val loss "
             f"{_fmt(result.get('target'))}")
    render_table(cols, rows, title=title, plain=plain)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "ablation.jsonl", "w", encoding="utf-8") as fh:
        for cell in result["cells"].values():
            for role in ("tuning", "eval"):
                for r in cell[role]:
                    fh.write(json.dumps(_clean({**r, "roles": [role], "cell": [cell["P"], cell["Phi"]]})) + "\n")
    md = [f"# Operator ablation: P × Φ on {result['workload']}", "", __doc__.split("\n\n", 1)[1], "",
          f"Budget {result['budget']} steps; lr grid factors {result['grid']} around each P's base lr "
          f"{BASE_LR}; {result['seeds']} evaluation seed(s). Runs: {result['counts']}.", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    if result["notes"]:
        md += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    files = [out / "ablation.jsonl", out / "ablation.md"]
    if _heatmap(result, out / "ablation.png"):
        md += ["", "![ablation](ablation.png)"]
        files.append(out / "ablation.png")
    (out / "ablation.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return files


def _heatmap(result: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False

    grid = [[result["cells"].get(f"{p}|{phi}", {}).get("test_mean", math.nan) for phi in PHI_CHOICES] for p in P_CHOICES]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
    ax.set_xticks(range(len(PHI_CHOICES)), PHI_CHOICES)
    ax.set_yticks(range(len(P_CHOICES)), P_CHOICES)
    ax.set(xlabel="Φ (accumulation)", ylabel="P (preconditioner)", title=f"test loss, {result['workload']}")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, "skipped" if math.isnan(v) else f"{v:.3f}", ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["BASE_LR", "PHI_CHOICES", "P_CHOICES", "cell_chain", "cell_name", "make_optimizer", "run", "write"]
