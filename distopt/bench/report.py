"""From run records to results: analysis, ranked tables, ``report.md``, PNG plots, JSONL I/O.

Everything here is recomputed from the saved records (``results.jsonl`` and ``suite.json``), so
``distopt bench report DIR`` re-renders a report without running anything. Definitions:

- **tuned lr**: best final validation metric over the tuning grid (tuning replicate only);
- **final test metric**: mean over the evaluation seeds with a 95 % percentile-bootstrap CI;
- **target** (per workload): the median final validation metric of tuned AdamW;
  **steps-/time-to-target**: first evaluation at or beyond it (training time, evaluation
  excluded), median over seeds, ``∞`` when most seeds miss; **speedup vs AdamW** = AdamW's median
  steps-to-target / the optimizer's;
- **lr width**: log2 range of learning rates (tuning replicate, budget B, grid + factor-2
  sensitivity points) within the workload's δ of the best final validation metric;
- **performance profile**: AlgoPerf's ρ(τ) on median time- (and steps-) to-target across
  workloads, scored by its normalised area for τ in [1, 4];
- **horizon agreement**: Spearman and Kendall correlation between optimizers' final validation
  metrics at B and at 3B (same seeds).
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from distopt.bench import pyplot, stats
from distopt.bench.table import render_table

TAUS = tuple(1 + 0.05 * i for i in range(61))  # τ in [1, 4]
INF = math.inf


# ------------------------------------------------------------------------------------------ analysis


@dataclass
class Row:
    """One optimizer on one workload."""

    optimizer: str
    workload: str
    tuned_lr: float | None = None
    grid_edge: bool = False
    test: list[float] = field(default_factory=list)
    test_mean: float = math.nan
    test_ci: tuple[float, float] = (math.nan, math.nan)
    val_median: float = math.nan
    steps_to_target: float = math.nan
    time_to_target: float = math.nan
    hits: int = 0
    speedup: float = math.nan
    diverged: int = 0
    errors: list[str] = field(default_factory=list)
    width: float = math.nan
    sensitivity: list[tuple[float, float]] = field(default_factory=list)  # (lr, final val)
    state_bpp: float = math.nan
    peak_bytes: float = math.nan
    overhead: float = math.nan
    step_ms: float = math.nan
    self_lr: float | None = None
    self_test_mean: float = math.nan
    self_test_ci: tuple[float, float] = (math.nan, math.nan)
    self_steps: float = math.nan
    self_time: float = math.nan
    score_b: float = math.nan
    score_3b: float = math.nan
    rank: int = 0
    self_rank: int = 0

    @property
    def n(self) -> int:
        return len(self.test)


@dataclass
class WorkloadResult:
    name: str
    metric: str
    higher: bool
    budget: int
    proxy: str
    target: float | None
    rows: list[Row]
    spearman: float = math.nan
    kendall: float = math.nan
    horizon_n: int = 0


@dataclass
class Analysis:
    workloads: list[WorkloadResult]
    profile_time: dict[str, list[float]]
    profile_steps: dict[str, list[float]]
    profile_self: dict[str, list[float]]
    optimizers: list[str]

    def rows(self, optimizer: str) -> list[Row]:
        return [r for w in self.workloads for r in w.rows if r.optimizer == optimizer]


def _val(r: dict[str, Any]) -> float:
    v = r["metrics"].get("final_val")
    return math.nan if v is None else float(v)


def _test(r: dict[str, Any]) -> float:
    v = r["metrics"].get("final_test")
    return math.nan if v is None else float(v)


def _run_target(r: dict[str, Any], target: float | None, higher: bool) -> tuple[float, float]:
    """(steps, seconds) to reach ``target`` in one run; (inf, inf) on a miss."""
    if target is None or r.get("error"):
        return INF, INF
    c = r.get("curves") or {}
    steps, vals, times = c.get("step", []), c.get("val", []), c.get("time_s", [])
    vals = [math.nan if v is None else v for v in vals]
    s = stats.steps_to_target(steps, vals, target, higher)
    if not math.isfinite(s):
        return INF, INF
    return s, times[steps.index(int(s))]


def _score(values: Iterable[float], higher: bool, failure: float) -> list[float]:
    return [failure if (v is None or math.isnan(v)) else v for v in values]


def _ordered(rows: list[Row], higher: bool, attr: str = "test_mean") -> list[Row]:
    def key(r: Row) -> float:
        v = getattr(r, attr)
        if math.isnan(v):
            return INF
        return -v if higher else v

    return sorted(rows, key=lambda r: (key(r), r.optimizer))


def analyze(records: list[dict[str, Any]]) -> Analysis:
    """Group the records by workload and optimizer and compute every metric of the report."""
    by: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    wl_info: dict[str, dict[str, Any]] = {}
    for r in records:
        cfg = r["config"]
        for role in r.get("roles", ["eval"]):
            by[(cfg["workload"], cfg["optimizer"])][role].append(r)
        if cfg["kind"] == "train" and "tune" in r.get("roles", []) or cfg["workload"] not in wl_info:
            wl_info[cfg["workload"]] = {**r["workload"], "budget_run": cfg["budget"]}
    optimizers = sorted({o for (_, o) in by})
    results = []
    for wl in sorted(wl_info):
        info = wl_info[wl]
        higher = info["metric"] == "accuracy"
        failure = info.get("failure_value", 0.0 if higher else INF)
        delta = info.get("sensitivity_delta", 0.01)
        adamw_eval = [r for r in by.get((wl, "adamw"), {}).get("eval", []) if not r.get("error")]
        target = stats.median(_score([_val(r) for r in adamw_eval], higher, failure)) if adamw_eval else None
        rows = []
        for opt in optimizers:
            roles = by.get((wl, opt))
            if not roles:
                continue
            rows.append(_row(opt, wl, roles, target, higher, failure, delta))
        adamw = next((r for r in rows if r.optimizer == "adamw"), None)
        for row in rows:
            if adamw is not None and math.isfinite(adamw.steps_to_target):
                row.speedup = adamw.steps_to_target / row.steps_to_target if row.steps_to_target > 0 else math.nan
        for i, row in enumerate(_ordered(rows, higher)):
            row.rank = i + 1
        for i, row in enumerate(_ordered(rows, higher, "self_test_mean")):
            row.self_rank = i + 1 if not math.isnan(row.self_test_mean) else 0
        budget = max((r["config"]["budget"] for roles in by.values() for r in roles.get("eval", [])
                      if r["config"]["workload"] == wl), default=info.get("budget", 0))
        res = WorkloadResult(wl, info["metric"], higher, budget, info.get("proxy", ""), target, _ordered(rows, higher))
        pairs = [(r.score_b, r.score_3b) for r in rows if not (math.isnan(r.score_b) or math.isnan(r.score_3b))]
        res.horizon_n = len(pairs)
        if len(pairs) >= 3:
            res.spearman = stats.spearman([p[0] for p in pairs], [p[1] for p in pairs])
            res.kendall = stats.kendall([p[0] for p in pairs], [p[1] for p in pairs])
        results.append(res)
    def prof(attr: str) -> dict[str, list[float]]:
        times = {o: {w.name: getattr(r, attr) for w in results for r in w.rows
                     if r.optimizer == o and not math.isnan(getattr(r, attr))} for o in optimizers}
        return stats.performance_profile({o: t for o, t in times.items() if t}, TAUS)

    return Analysis(results, prof("time_to_target"), prof("steps_to_target"), prof("self_time"), optimizers)


def _row(opt: str, wl: str, roles: dict[str, list[dict[str, Any]]], target: float | None, higher: bool,
         failure: float, delta: float) -> Row:
    row = Row(opt, wl)
    tune = [r for r in roles.get("tune", [])]
    if tune:
        from distopt.bench.runner import select_lr

        row.tuned_lr = select_lr(tune, higher)
        lrs = sorted(r["config"]["lr"] for r in tune)
        row.grid_edge = len(lrs) > 1 and row.tuned_lr in (lrs[0], lrs[-1])
    ev = roles.get("eval", [])
    row.errors = sorted({r["error"] for rs in roles.values() for r in rs if r.get("error")})
    if ev:
        if row.tuned_lr is None:
            row.tuned_lr = ev[0]["config"]["lr"]
        row.test = _score([_test(r) for r in ev], higher, failure)
        row.test_mean, row.test_ci = statistics.fmean(row.test), stats.bootstrap_ci(row.test)
        row.val_median = stats.median(_score([_val(r) for r in ev], higher, failure))
        hits = [_run_target(r, target, higher) for r in ev]
        row.hits = sum(math.isfinite(h[0]) for h in hits)
        if target is not None:
            row.steps_to_target = stats.median([h[0] for h in hits])
            row.time_to_target = stats.median([h[1] for h in hits])
        row.diverged = sum(bool(r["metrics"].get("diverged")) for r in ev)
        ok = [r for r in ev if not r.get("error")]
        row.state_bpp = _median(r["metrics"].get("state_bytes_per_param") for r in ok)
        row.overhead = _median(r["metrics"].get("step_overhead") for r in ok)
        row.step_ms = _median(1e3 * r["metrics"]["step_time_s"] / r["metrics"]["steps"] for r in ok
                              if r["metrics"].get("step_time_s") is not None and r["metrics"].get("steps"))
        row.peak_bytes = _median(r["metrics"].get("peak_memory_bytes") for r in ok)
        mem = [r for r in roles.get("memory", []) if not r.get("error")]
        if mem:
            row.peak_bytes = _median(r["metrics"].get("peak_memory_bytes") for r in mem)
            if math.isnan(row.state_bpp):
                row.state_bpp = _median(r["metrics"].get("state_bytes_per_param") for r in mem)
    sens = {r["config"]["lr"]: _score([_val(r)], higher, failure)[0]
            for r in roles.get("tune", []) + roles.get("sensitivity", []) if not r.get("error")}
    row.sensitivity = sorted(sens.items())
    if len(sens) >= 2:
        scores = [v if math.isfinite(v) else math.nan for v in sens.values()]
        row.width = stats.lr_sensitivity_width(list(sens), scores, delta, higher)
    selfr = roles.get("self", [])
    if selfr:
        row.self_lr = selfr[0]["config"]["lr"]
        vals = _score([_test(r) for r in selfr], higher, failure)
        if all(math.isfinite(v) for v in vals):
            row.self_test_mean, row.self_test_ci = statistics.fmean(vals), stats.bootstrap_ci(vals)
        hits = [_run_target(r, target, higher) for r in selfr]
        if target is not None:
            row.self_steps = stats.median([h[0] for h in hits])
            row.self_time = stats.median([h[1] for h in hits])
    hor = roles.get("horizon", [])
    if hor:
        seeds = {r["config"]["init_seed"] for r in hor}
        row.score_3b = stats.median(_score([_val(r) for r in hor], higher, failure))
        row.score_b = stats.median(_score([_val(r) for r in ev if r["config"]["init_seed"] in seeds], higher, failure))
    return row


def _median(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else math.nan


# ------------------------------------------------------------------------------------------ formatting


def fmt_metric(v: float, metric: str) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{100 * v:.2f}" if metric == "accuracy" else f"{v:.4f}"


def _fmt_ci(mean: float, ci: tuple[float, float], metric: str) -> str:
    if math.isnan(mean):
        return "-"
    if math.isnan(ci[0]):
        return fmt_metric(mean, metric)
    return f"{fmt_metric(mean, metric)} [{fmt_metric(ci[0], metric)}, {fmt_metric(ci[1], metric)}]"


def _fmt_steps(v: float, hits: int | None = None, n: int | None = None) -> str:
    if math.isnan(v):
        return "-"
    text = "∞" if math.isinf(v) else f"{v:.0f}"
    return text if hits is None or n is None or hits == n else f"{text} ({hits}/{n})"


def _fmt(v: float, spec: str, suffix: str = "") -> str:
    return "-" if v is None or math.isnan(v) else (("∞" if math.isinf(v) else format(v, spec)) + suffix)


TABLE_COLUMNS = ("rank", "optimizer", "tuned lr", "test {m} [95% CI]", "steps→target", "time→target s",
                 "speedup vs AdamW", "diverged", "lr width log2", "state B/param", "peak MB", "step overhead")


def ranked_rows(w: WorkloadResult) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = [c.replace("{m}", "acc %" if w.metric == "accuracy" else "loss") for c in TABLE_COLUMNS]
    rows = []
    for r in w.rows:
        lr = "-" if r.tuned_lr is None else f"{r.tuned_lr:g}" + ("*" if r.grid_edge else "")
        err = " (error)" if r.errors and not r.test else ""
        rows.append((
            r.rank, r.optimizer + err, lr, _fmt_ci(r.test_mean, r.test_ci, w.metric),
            _fmt_steps(r.steps_to_target, r.hits, r.n), _fmt(r.time_to_target, ".2f"),
            "miss" if math.isinf(r.steps_to_target) else _fmt(r.speedup, ".2f", "x"),
            f"{r.diverged}/{r.n}" if r.n else "-", _fmt(r.width, ".1f"), _fmt(r.state_bpp, ".2f"),
            _fmt(r.peak_bytes / 2**20 if not math.isnan(r.peak_bytes) else math.nan, ".2f"),
            _fmt(100 * r.overhead if not math.isnan(r.overhead) else math.nan, ".1f", " %"),
        ))
    return cols, rows


def overall_rows(a: Analysis) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = ["optimizer", "mean rank", "profile score (time)", "profile score (steps)", "self-tuning mean rank",
            "self-tuning profile score"]
    rows = []
    for o in a.optimizers:
        rs = a.rows(o)
        ranks = [r.rank for r in rs if r.n]
        sranks = [r.self_rank for r in rs if r.self_rank]
        rows.append((o, _fmt(statistics.fmean(ranks) if ranks else math.nan, ".2f"),
                     _fmt(stats.profile_score(a.profile_time[o], TAUS), ".3f") if o in a.profile_time else "-",
                     _fmt(stats.profile_score(a.profile_steps[o], TAUS), ".3f") if o in a.profile_steps else "-",
                     _fmt(statistics.fmean(sranks) if sranks else math.nan, ".2f"),
                     _fmt(stats.profile_score(a.profile_self[o], TAUS), ".3f") if o in a.profile_self else "-"))
    rows.sort(key=lambda t: float(t[1]) if t[1] != "-" else INF)
    return cols, rows


def self_tuning_rows(a: Analysis) -> tuple[list[str], list[tuple[Any, ...]]]:
    cols = ["optimizer", "base lr"] + [f"{w.name} test {'acc %' if w.metric == 'accuracy' else 'loss'}"
                                       for w in a.workloads] + ["steps→target (per workload)", "mean rank"]
    rows = []
    for o in a.optimizers:
        rs = {r.workload: r for r in a.rows(o)}
        lr = next((r.self_lr for r in rs.values() if r.self_lr is not None), None)
        if lr is None:
            continue
        cells = [_fmt_ci(rs[w.name].self_test_mean, rs[w.name].self_test_ci, w.metric) if w.name in rs else "-"
                 for w in a.workloads]
        steps = " / ".join(_fmt_steps(rs[w.name].self_steps) if w.name in rs else "-" for w in a.workloads)
        ranks = [r.self_rank for r in rs.values() if r.self_rank]
        rows.append((o, f"{lr:g}", *cells, steps, _fmt(statistics.fmean(ranks) if ranks else math.nan, ".2f")))
    rows.sort(key=lambda t: float(t[-1]) if t[-1] != "-" else INF)
    return cols, rows


def print_results(a: Analysis, file: TextIO | None = None, plain: bool = False) -> None:
    """The ranked table of every workload, then the overall table."""
    for w in a.workloads:
        cols, rows = ranked_rows(w)
        target = "-" if w.target is None else fmt_metric(w.target, w.metric)
        title = (f"{w.name} ({w.proxy}): {w.metric}, B={w.budget} steps, target = tuned AdamW median val "
                 f"{'acc %' if w.metric == 'accuracy' else 'loss'} {target}")
        render_table(cols, rows, title=title, file=file, plain=plain)
    if len(a.workloads) > 1 or any(r.self_rank for w in a.workloads for r in w.rows):
        cols, rows = overall_rows(a)
        render_table(cols, rows, title="overall (ranks by mean test metric; AlgoPerf profile scores in [0, 1])",
                     file=file, plain=plain)


# ------------------------------------------------------------------------------------------- markdown


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(a: Analysis, path: Path, meta: dict[str, Any], plots: list[str]) -> None:
    s = meta.get("settings", {})
    env = meta.get("environment", {})
    parts = [f"# distopt bench — suite `{s.get('suite', '?')}`", ""]
    parts += ["The survey's evaluation (23 optimizers, lr-only grid around a base lr, final accuracy) made "
              "rigorous: equal tuning budget per optimizer, evaluation on separate seeds with 95 % bootstrap CIs, "
              "steps- and time-to-target against tuned AdamW, lr sensitivity, a self-tuning track, memory and "
              "step overhead, and agreement between horizons B and 3B.", ""]
    parts += ["## Settings", "", _md_table(("setting", "value"), [(k, v) for k, v in s.items() if k != "notes"]), ""]
    if env:
        parts += ["Environment: " + ", ".join(f"{k}={v}" for k, v in env.items()), ""]
    if meta.get("wall_s") is not None:
        parts += [f"Wall time: {meta['wall_s']:.1f} s; runs: {meta.get('counts')}", ""]
    parts += ["## Protocol", "",
              "- Tuning: each optimizer runs every point of its declared lr grid once (tuning replicate: init seed "
              "100, data seed 10100); tuned lr = best final validation metric. `*` marks a tuned lr at the edge "
              "of its grid (widen the grid).",
              "- Evaluation: tuned lr on replicates r = 0..S-1 (init seed r, data-order seed 10000 + r). Test "
              "metric: mean [95 % percentile bootstrap CI] over seeds; diverged runs score chance accuracy / the "
              "uniform predictor's loss.",
              "- Target: median final validation metric of tuned AdamW; steps/time→target: first evaluation "
              "reaching it (median over seeds; ∞ = most seeds miss; (h/n) = seeds that hit). Time excludes "
              "evaluation. Speedup vs AdamW = AdamW's median steps→target / the optimizer's.",
              "- lr width: log2 range of lrs within δ of the best final validation metric (tuning replicate; grid "
              "and factor-2 points); a lower bound measured on the grid.",
              "- Peak memory: CPU = live tensors (TorchDispatchMode counter) over 3 steps; CUDA = "
              "max_memory_allocated. Step overhead = time inside step() outside the closure / training time.",
              ""]
    for w in a.workloads:
        cols, rows = ranked_rows(w)
        target = "-" if w.target is None else fmt_metric(w.target, w.metric)
        parts += [f"## {w.name} — {w.proxy}", "",
                  f"Metric: {w.metric} ({'higher' if w.higher else 'lower'} is better), B = {w.budget} steps, "
                  f"target = {target}.", "", _md_table(cols, rows), ""]
        errs = sorted({e for r in w.rows for e in r.errors})
        if errs:
            parts += ["Errors: " + "; ".join(errs[:5]), ""]
    if a.workloads:
        cols, rows = overall_rows(a)
        parts += ["## Overall", "", "Mean rank over workloads (by mean test metric) and AlgoPerf-style performance "
                  "profile scores: area under ρ(τ) for τ ∈ [1, 4], normalised to [0, 1], from median "
                  "time-to-target (and steps-to-target).", "", _md_table(cols, rows), ""]
        cols, rows = self_tuning_rows(a)
        if rows:
            parts += ["## Self-tuning track", "", "One configuration per optimizer for every workload (its base lr, "
                      "no tuning), same seeds and target.", "", _md_table(cols, rows), ""]
        hz = [(w.name, w.horizon_n, _fmt(w.spearman, ".3f"), _fmt(w.kendall, ".3f")) for w in a.workloads if w.horizon_n]
        if hz:
            parts += ["## Horizon B vs 3B", "", "Rank agreement of the optimizers' final validation metric at B "
                      "and at 3B (tuned lr, same seeds). 1 = same ranking.", "",
                      _md_table(("workload", "optimizers", "Spearman ρ", "Kendall τ-b"), hz), ""]
    notes = list(s.get("notes", [])) + list(meta.get("notes", []))
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    for p in plots:
        parts += [f"![{p}]({p})", ""]
    path.write_text("\n".join(parts), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ plots


def plot_all(a: Analysis, records: list[dict[str, Any]], out: Path) -> list[str]:
    """Write the PNGs; return their file names (empty without matplotlib)."""
    plt = pyplot() if a.workloads else None
    if plt is None:
        return []

    written = []
    for name, fn in (("curves.png", _plot_curves), ("lr_sensitivity.png", _plot_sensitivity),
                     ("performance_profiles.png", _plot_profiles), ("memory.png", _plot_memory)):
        fig = fn(plt, a, records)
        if fig is not None:
            fig.savefig(out / name, dpi=100)
            plt.close(fig)
            written.append(name)
    return written


def _colors(a: Analysis) -> dict[str, Any]:
    import matplotlib

    n = len(a.optimizers)
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return {o: cmap(i % cmap.N) for i, o in enumerate(a.optimizers)}


def _plot_curves(plt: Any, a: Analysis, records: list[dict[str, Any]]) -> Any:
    n = len(a.workloads)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    colors = _colors(a)
    for ax, w in zip(axes[0], a.workloads):
        finals: list[float] = []
        for row in w.rows:
            runs = [r for r in records if r["config"]["workload"] == w.name and r["config"]["optimizer"] == row.optimizer
                    and "eval" in r.get("roles", []) and (r.get("curves") or {}).get("step")]
            if not runs:
                continue
            steps = max((r["curves"]["step"] for r in runs), key=len)
            med, lo, hi = [], [], []
            for i in range(len(steps)):
                vals = [r["curves"]["val"][i] for r in runs if len(r["curves"]["val"]) > i and r["curves"]["val"][i] is not None]
                med.append(statistics.median(vals) if vals else math.nan)
                lo.append(min(vals) if vals else math.nan)
                hi.append(max(vals) if vals else math.nan)
            finals += [v for v in med[-1:] if math.isfinite(v)]
            ax.plot(steps, med, color=colors[row.optimizer], label=f"{row.optimizer} ({row.tuned_lr:g})")
            ax.fill_between(steps, lo, hi, color=colors[row.optimizer], alpha=0.15, linewidth=0)
        if w.target is not None:
            ax.axhline(w.target, color="k", linestyle="--", linewidth=0.8, label="target (AdamW median)")
        ax.set(xlabel="step", ylabel=f"validation {w.metric}", title=f"{w.name}: median and range over seeds")
        if w.metric == "loss":
            finite = [v for r in records if r["config"]["workload"] == w.name for v in (r.get("curves") or {}).get("val", [])
                      if v is not None and math.isfinite(v)]
            if finite:
                ax.set_ylim(min(finite) * 0.97, min(max(finite), 2.5 * min(finite)))
        else:
            low = min(finals + ([w.target] if w.target is not None else []), default=0.5)
            ax.set_ylim(max(0.0, low - 0.15), 1.0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_sensitivity(plt: Any, a: Analysis, records: list[dict[str, Any]]) -> Any:
    n = len(a.workloads)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False)
    colors = _colors(a)
    for ax, w in zip(axes[0], a.workloads):
        for row in w.rows:
            if len(row.sensitivity) < 2 or row.tuned_lr is None:
                continue
            xs = [math.log2(lr / row.tuned_lr) for lr, _ in row.sensitivity]
            ys = [v for _, v in row.sensitivity]
            ax.plot(xs, ys, marker="o", markersize=3, color=colors[row.optimizer],
                    label=f"{row.optimizer} (width {_fmt(row.width, '.1f')})")
        if not any(len(r.sensitivity) >= 2 for r in w.rows):
            ax.text(0.5, 0.5, "no sensitivity runs", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set(xlabel="log2(lr / tuned lr)", ylabel=f"final validation {w.metric}", title=f"{w.name}: lr sensitivity")
        if w.metric == "accuracy":
            ax.set_ylim(0, 1.0)
        else:
            vals = [v for r in w.rows for _, v in r.sensitivity if math.isfinite(v)]
            if vals:
                ax.set_ylim(min(vals) * 0.97, min(max(vals), 1.6 * min(vals)))
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _plot_profiles(plt: Any, a: Analysis, records: list[dict[str, Any]]) -> Any:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = _colors(a)
    for ax, (title, prof) in zip(axes, (("time-to-target (tuned)", a.profile_time),
                                        ("steps-to-target (tuned)", a.profile_steps),
                                        ("time-to-target (self-tuning)", a.profile_self))):
        for o, ys in prof.items():
            ax.step(TAUS, ys, where="post", color=colors[o], label=f"{o} ({stats.profile_score(ys, TAUS):.2f})")
        ax.set(xlabel="τ (ratio to fastest)", ylabel="fraction of workloads ρ(τ)", title=title, ylim=(-0.02, 1.02))
        if prof:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no runs", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def _plot_memory(plt: Any, a: Analysis, records: list[dict[str, Any]]) -> Any:
    n = len(a.workloads)
    fig, axes = plt.subplots(2, n, figsize=(5.5 * n, 6.5), squeeze=False)
    for j, w in enumerate(a.workloads):
        rows = sorted(w.rows, key=lambda r: r.optimizer)
        names = [r.optimizer for r in rows]
        axes[0][j].bar(names, [0 if math.isnan(r.state_bpp) else r.state_bpp for r in rows], color="tab:blue")
        axes[0][j].set(ylabel="optimizer state, bytes/param", title=f"{w.name}: optimizer state")
        axes[1][j].bar(names, [0 if math.isnan(r.peak_bytes) else r.peak_bytes / 2**20 for r in rows], color="tab:orange")
        axes[1][j].set(ylabel="peak memory, MiB", title=f"{w.name}: peak memory")
        for ax in (axes[0][j], axes[1][j]):
            ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------- I/O


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    """One JSON object per run (NaN/inf written as null), in a stable order."""
    key = lambda r: (r["config"]["workload"], r["config"]["optimizer"], r["config"]["kind"], r["config"]["budget"],  # noqa: E731
                     r["config"]["lr"], r["config"]["init_seed"])
    with open(path, "w", encoding="utf-8") as fh:
        for r in sorted(records, key=key):
            fh.write(json.dumps(_clean(r)) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def render(records: list[dict[str, Any]], out: Path, meta: dict[str, Any], plain: bool = False,
           file: TextIO | None = None) -> tuple[Analysis, list[Path]]:
    """Analyse, print the tables, write report.md and the plots under ``out``."""
    a = analyze(records)
    print_results(a, file=file, plain=plain)
    plots = plot_all(a, records, out)
    if not plots:
        meta.setdefault("notes", []).append('no plots: matplotlib is not installed (pip install "distopt[bench]")')
    write_markdown(a, out / "report.md", meta, plots)
    return a, [out / "report.md"] + [out / p for p in plots]


def render_dir(directory: Path, plain: bool = False, file: TextIO | None = None) -> tuple[Analysis, list[Path]]:
    """Re-render ``report.md`` and the plots from ``results.jsonl`` and ``suite.json`` in ``directory``."""
    directory = Path(directory)
    results = directory / "results.jsonl"
    if not results.is_file():
        raise FileNotFoundError(f"{results} not found: give the --out directory of a finished `distopt bench` run")
    meta_path = directory / "suite.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    return render(read_jsonl(results), directory, meta, plain=plain, file=file)


__all__ = ["Analysis", "Row", "WorkloadResult", "analyze", "fmt_metric", "overall_rows", "plot_all", "print_results",
           "ranked_rows", "read_jsonl", "render", "render_dir", "self_tuning_rows", "write_jsonl", "write_markdown"]
