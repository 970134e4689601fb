"""Statistics of the benchmark protocol (pure Python, no NumPy needed).

- :func:`bootstrap_ci`: percentile bootstrap confidence interval of a statistic over seeds.
- :func:`steps_to_target`: first evaluation step at which a curve reaches a target (``inf`` if never).
- :func:`performance_profile` and :func:`profile_score`: AlgoPerf-style performance profiles
  (Dolan & Moré 2002; Dahl et al., "Benchmarking Neural Network Training Algorithms", 2023):
  ``ρ_s(τ)`` = fraction of workloads on which optimizer ``s`` reaches the target within ``τ`` times
  the fastest optimizer's time.
- :func:`lr_sensitivity_width`: width, in log2 units of the learning rate, of the contiguous
  range of grid points whose score is within ``δ`` of the best.
- :func:`spearman` and :func:`kendall`: rank correlations (average ranks for ties; Kendall's
  τ-b) between two horizons' rankings.
"""
from __future__ import annotations

import math
import random
import statistics
from typing import Callable, Mapping, Sequence

INF = math.inf


def median(values: Sequence[float]) -> float:
    """Median (``inf`` entries count as larger than any number; NaN if empty)."""
    vals = sorted(values)
    if not vals:
        return math.nan
    n = len(vals)
    if n % 2:
        return vals[n // 2]
    a, b = vals[n // 2 - 1], vals[n // 2]
    return a if a == b else (a + b) / 2  # inf + inf / 2 is inf; inf and a number gives inf


def bootstrap_ci(values: Sequence[float], stat: Callable[[Sequence[float]], float] = statistics.fmean,
                 level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` over ``values`` (resampled with replacement).

    One value gives the degenerate interval ``(v, v)``; no values give ``(nan, nan)``. Deterministic
    for a given ``seed``. The bounds are the ``(1-level)/2`` and ``(1+level)/2`` empirical quantiles
    (linear interpolation) of the bootstrap distribution.
    """
    vals = list(values)
    if not vals:
        return (math.nan, math.nan)
    if len(vals) == 1 or all(v == vals[0] for v in vals):
        return (float(vals[0]), float(vals[0]))
    rng = random.Random(seed)
    boots = sorted(stat([rng.choice(vals) for _ in vals]) for _ in range(n_boot))
    return (_quantile(boots, (1 - level) / 2), _quantile(boots, (1 + level) / 2))


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or sorted_vals[lo] == sorted_vals[hi]:
        return sorted_vals[lo]
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def reaches(value: float, target: float, higher_is_better: bool) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= target if higher_is_better else value <= target


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float, higher_is_better: bool) -> float:
    """The first ``steps[i]`` with ``values[i]`` at or beyond ``target``; ``inf`` if none (a miss)."""
    for s, v in zip(steps, values):
        if reaches(v, target, higher_is_better):
            return float(s)
    return INF


def performance_profile(times: Mapping[str, Mapping[str, float]], taus: Sequence[float]) -> dict[str, list[float]]:
    """``times[optimizer][workload]`` (``inf`` = missed target) -> ``{optimizer: [ρ(τ) for τ in taus]}``.

    ``r_{s,w} = t_{s,w} / min_s t_{s,w}``; ``ρ_s(τ) = |{w : r_{s,w} <= τ}| / |W|``. Workloads that no
    optimizer solves count as missed for everyone (they stay in the denominator).
    """
    workloads = sorted({w for per in times.values() for w in per})
    best = {w: min((per.get(w, INF) for per in times.values()), default=INF) for w in workloads}
    out: dict[str, list[float]] = {}
    for s, per in times.items():
        ratios = [per.get(w, INF) / best[w] if math.isfinite(best[w]) and best[w] > 0 else
                  (1.0 if best[w] == 0 and per.get(w, INF) == 0 else INF) for w in workloads]
        out[s] = [sum(r <= tau for r in ratios) / max(len(workloads), 1) for tau in taus]
    return out


def profile_score(profile: Sequence[float], taus: Sequence[float]) -> float:
    """AlgoPerf's benchmark score: the area under ``ρ(τ)`` over ``[τ_0, τ_max]`` (trapezoid rule on
    the given grid, linear in ``τ``), divided by ``τ_max - τ_0`` so that a perfect profile scores 1."""
    if len(taus) < 2:
        return profile[0] if profile else math.nan
    area = sum((taus[i + 1] - taus[i]) * (profile[i] + profile[i + 1]) / 2 for i in range(len(taus) - 1))
    return area / (taus[-1] - taus[0])


def lr_sensitivity_width(lrs: Sequence[float], scores: Sequence[float], delta: float,
                         higher_is_better: bool) -> float:
    """log2(lr_hi / lr_lo) of the contiguous run of grid points (sorted by lr) around the best
    score whose scores are within ``delta`` (absolute) of the best. NaN scores break a run; a
    single good point gives 0; no finite score gives NaN. A lower bound of the true width, since
    it is measured on the grid."""
    pts = sorted(zip(lrs, scores))
    ok = [(lr, s) for lr, s in pts if s is not None and not math.isnan(s)]
    if not ok:
        return math.nan
    best = max(s for _, s in ok) if higher_is_better else min(s for _, s in ok)
    good = [s is not None and not math.isnan(s) and (s >= best - delta if higher_is_better else s <= best + delta)
            for _, s in pts]
    i_best = next(i for i, (_, s) in enumerate(pts) if s == best)
    lo = hi = i_best
    while lo > 0 and good[lo - 1]:
        lo -= 1
    while hi < len(pts) - 1 and good[hi + 1]:
        hi += 1
    return math.log2(pts[hi][0] / pts[lo][0])


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks (ascending), ties get the average of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: Pearson correlation of the (average) ranks; NaN for fewer than 2 pairs or constant input."""
    if len(x) != len(y):
        raise ValueError("spearman: x and y must have the same length")
    return _pearson(ranks(x), ranks(y)) if len(x) >= 2 else math.nan


def kendall(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b: (concordant - discordant) / sqrt((n0 - ties_x)(n0 - ties_y))."""
    if len(x) != len(y):
        raise ValueError("kendall: x and y must have the same length")
    n = len(x)
    conc = disc = tx = ty = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom > 0 else math.nan


__all__ = ["INF", "bootstrap_ci", "kendall", "lr_sensitivity_width", "median", "performance_profile",
           "profile_score", "ranks", "reaches", "spearman", "steps_to_target"]
