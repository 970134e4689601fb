"""Summaries of a suite: the results table, ``results.jsonl``, ``report.md`` and a loss-curve plot."""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from distopt.bench import optional
from distopt.bench.runner import RunRecord
from distopt.bench.table import render_table

COLUMNS = ("optimizer", "best lr", "test acc", "train loss", "steps to target", "step ms", "step time ÷ adamw")


@dataclass
class Summary:
    """One optimizer's best learning rate (lowest mean final train loss) and its numbers over seeds."""

    optimizer: str
    best_lr: float
    acc_mean: float
    acc_std: float
    train_loss: float
    steps_to_target: str
    step_ms: float
    ratio_vs_adamw: float | None
    runs: list[RunRecord]

    def row(self) -> tuple[Any, ...]:
        ratio = None if self.ratio_vs_adamw is None else f"{self.ratio_vs_adamw:.2f}x"
        acc = f"{100 * self.acc_mean:.2f} ± {100 * self.acc_std:.2f} %"
        return (self.optimizer, f"{self.best_lr:g}", acc, f"{self.train_loss:.4f}", self.steps_to_target,
                f"{self.step_ms:.3f}", ratio)


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def _std(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _key_loss(runs: list[RunRecord]) -> float:
    loss = _mean([r.final_train_loss for r in runs])
    return math.inf if math.isnan(loss) or any(r.error for r in runs) else loss


def _steps_to_target(runs: list[RunRecord]) -> str:
    hit = [r.steps_to_target for r in runs if r.steps_to_target is not None]
    if not hit:
        return f"> {max(r.steps for r in runs)}"
    text = f"{statistics.fmean(hit):.0f}"
    return text if len(hit) == len(runs) else f"{text} ({len(hit)}/{len(runs)} seeds)"


def summarize(records: list[RunRecord]) -> list[Summary]:
    """Group runs by optimizer and lr; keep each optimizer's best lr."""
    grid: dict[str, dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        grid[r.optimizer][r.lr].append(r)
    step_ms = {name: statistics.median([r.step_ms for lrs in by_lr.values() for r in lrs if not math.isnan(r.step_ms)]
                                       or [math.nan]) for name, by_lr in grid.items()}
    base = step_ms.get("adamw")
    out = []
    for name, by_lr in grid.items():
        lr, runs = min(by_lr.items(), key=lambda kv: (_key_loss(kv[1]), kv[0]))
        ratio = step_ms[name] / base if base and not math.isnan(base) else None
        accs = [r.final_test_acc for r in runs]
        out.append(Summary(name, lr, _mean(accs), _std(accs), _mean([r.final_train_loss for r in runs]),
                           _steps_to_target(runs), step_ms[name], ratio, runs))
    return out


def print_results(summaries: list[Summary], file: TextIO | None = None, plain: bool = False) -> None:
    render_table(COLUMNS, [s.row() for s in summaries], title="distopt bench: MLP on digits", file=file, plain=plain)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_jsonl(records: list[RunRecord], path: Path) -> None:
    """One JSON object per run (NaN/inf written as null)."""
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(_clean(r.to_json())) + "\n")


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _grid_rows(records: list[RunRecord]) -> list[tuple[Any, ...]]:
    groups: dict[tuple[str, float], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.optimizer, r.lr)].append(r)
    rows = []
    for (name, lr), runs in groups.items():
        accs = [r.final_test_acc for r in runs]
        err = next((r.error for r in runs if r.error), None)
        rows.append((name, f"{lr:g}", f"{100 * _mean(accs):.2f} ± {100 * _std(accs):.2f}",
                     f"{_mean([r.final_train_loss for r in runs]):.4f}", len(runs), err))
    return rows


def write_markdown(summaries: list[Summary], records: list[RunRecord], path: Path, settings: dict[str, Any],
                   notes: list[str], plot: str | None) -> None:
    """``report.md``: settings, the summary table, the full lr grid, notes and the plot."""
    parts = ["# distopt bench: MLP on scikit-learn digits", "",
             "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "Best lr = lowest mean final train loss over seeds (chosen without the test set). "
             "Test accuracy is mean ± std over seeds. Step time is the optimizer's own time per step "
             "(forward/backward excluded), median over runs.", "",
             _markdown_table(COLUMNS, [s.row() for s in summaries]), "", "## Full grid", "",
             _markdown_table(("optimizer", "lr", "test acc %", "train loss", "seeds", "error"), _grid_rows(records))]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if plot:
        parts += ["", f"![loss curves]({plot})"]
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")


def plot_curves(summaries: list[Summary], path: Path) -> bool:
    """Train loss and test accuracy per epoch at each optimizer's best lr; False without matplotlib."""
    mpl = optional("matplotlib")
    if mpl is None:
        return False
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for s in summaries:
        curves = [r.train_loss for r in s.runs if r.train_loss]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        epochs = range(1, n + 1)
        ax_loss.plot(epochs, [_mean([c[i] for c in curves]) for i in range(n)], label=f"{s.optimizer} lr={s.best_lr:g}")
        ax_acc.plot(epochs, [_mean([r.test_acc[i] for r in s.runs if r.test_acc]) for i in range(n)], label=s.optimizer)
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="train loss (full set)", title="train loss, best lr")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy, best lr")
    ax_loss.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["Summary", "summarize", "print_results", "write_jsonl", "write_markdown", "plot_curves"]
