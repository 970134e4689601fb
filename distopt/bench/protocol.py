"""The benchmark protocol: which runs a suite makes, in two phases.

1. **Tuning** (equal budget): every optimizer (AdamW included) runs each point of its declared lr
   grid (:mod:`distopt.bench.search_space`) once, on the *tuning* replicate (init seed 100, data
   seed 10100, never used for evaluation). The tuned lr is the one with the best final validation
   metric (diverged runs rank last).
2. **Evaluation**, from the tuned lr:
   - ``eval``: ``seeds`` replicates (replicate r: init seed r, data-order seed 10000 + r), budget B;
   - ``sensitivity``: tuned lr × a factor-2 grid, tuning replicate, budget B (together with the
     tuning runs it gives the lr-sensitivity curve);
   - ``self``: the *self-tuning track*: each optimizer's base lr (one configuration for every
     workload), the evaluation replicates, budget B;
   - ``horizon``: tuned lr, budget ``horizon × B`` (3B), the first ``horizon_seeds`` replicates,
     to measure how rankings at B and 3B agree;
   - ``memory``: on CPU, one peak-memory probe per optimizer and workload.

Runs shared between roles (e.g. the tuning run at the tuned lr is the centre of the sensitivity
curve) are run once; every record lists its ``roles``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from distopt.bench.runner import Cache, RunSpec, base_workload, cache_key, close_pool, execute, make_spec, select_lr
from distopt.bench.search_space import round_lr, space

TUNING_REPLICATE = 100
DATA_SEED_OFFSET = 10_000


def replicate(r: int) -> tuple[int, int]:
    """(init seed, data-order seed) of replicate ``r``."""
    return r, DATA_SEED_OFFSET + r


@dataclass
class SuiteSettings:
    suite: str
    optimizers: list[str]
    workloads: list[str]
    seeds: int = 3
    grid: tuple[float, ...] | None = None  # None: each optimizer's declared grid
    sensitivity: tuple[float, ...] = (0.5, 1.0, 2.0)
    horizon: int = 3  # 0: no horizon runs
    horizon_seeds: int = 1
    self_tuning: bool = True
    memory: bool = True
    device: str = "cpu"
    quick: bool = False
    data: str | None = None
    budget_scale: float = 1.0
    jobs: int = 1
    threads: int = 1
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def budget(settings: SuiteSettings, workload: str) -> int:
    base = base_workload(workload, settings.device, settings.quick, settings.data).budget
    return max(1, round(base * settings.budget_scale))


def _spec(s: SuiteSettings, opt: str, wl: str, lr: float, rep: int, b: int, kind: str = "train") -> RunSpec:
    init, data = replicate(rep)
    return make_spec(opt, wl, lr, init, data, b, device=s.device, quick=s.quick, data=s.data, kind=kind)


def tuning_specs(s: SuiteSettings) -> dict[tuple[str, str], list[RunSpec]]:
    out = {}
    for wl in s.workloads:
        b = budget(s, wl)
        for opt in s.optimizers:
            out[(opt, wl)] = [_spec(s, opt, wl, lr, TUNING_REPLICATE, b) for lr in space(opt).lrs(s.grid)]
    return out


def evaluation_specs(s: SuiteSettings, tuned: dict[tuple[str, str], float]) -> list[tuple[RunSpec, str]]:
    specs: list[tuple[RunSpec, str]] = []
    for (opt, wl), lr in tuned.items():
        b = budget(s, wl)
        specs += [(_spec(s, opt, wl, lr, r, b), "eval") for r in range(s.seeds)]
        specs += [(_spec(s, opt, wl, lr * f, TUNING_REPLICATE, b), "sensitivity") for f in s.sensitivity]
        if s.self_tuning:
            specs += [(_spec(s, opt, wl, space(opt).base_lr, r, b), "self") for r in range(s.seeds)]
        if s.horizon and s.horizon != 1:
            specs += [(_spec(s, opt, wl, lr, r, b * s.horizon), "horizon") for r in range(min(s.horizon_seeds, s.seeds))]
        if s.memory and not s.device.startswith("cuda"):
            specs.append((_spec(s, opt, wl, lr, 0, b, kind="memory"), "memory"))
    return specs


def run_protocol(s: SuiteSettings, cache: Cache, progress: bool = True,
                 limit: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run (or read from ``cache``) every run of the suite. ``limit`` caps the number of *new* runs
    (the rest is left for a later call: what an interrupted suite looks like). Returns the records,
    each with its ``roles``, and a summary ``{"tuned": ..., "counts": ..., "complete": bool}``."""
    try:
        return _run_protocol(s, cache, progress, limit)
    finally:
        close_pool()


def _run_protocol(s: SuiteSettings, cache: Cache, progress: bool, limit: int | None
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    roles: dict[str, set[str]] = defaultdict(set)
    tune = tuning_specs(s)
    flat = [sp for sps in tune.values() for sp in sps]
    records, c1 = execute(flat, cache, s.jobs, s.threads, progress, desc="tuning", limit=limit)
    by_key = {r["key"]: r for r in records}

    tuned: dict[tuple[str, str], float] = {}
    for (opt, wl), sps in tune.items():
        recs = [by_key[k] for k in (cache_key(sp) for sp in sps) if k in by_key]
        for r in recs:
            roles[r["key"]].add("tune")
        if len(recs) == len(sps):
            higher = recs[0]["workload"]["metric"] == "accuracy"
            tuned[(opt, wl)] = round_lr(select_lr(recs, higher))
    counts = {"tuning": c1}
    complete = len(tuned) == len(tune)
    if tuned:
        left = None if limit is None else max(0, limit - c1["ran"])
        pairs = evaluation_specs(s, tuned)
        recs2, c2 = execute([p[0] for p in pairs], cache, s.jobs, s.threads, progress, desc="evaluation", limit=left)
        counts["evaluation"] = c2
        complete = complete and c2["cached"] + c2["ran"] == c2["total"]
        for r in recs2:
            by_key[r["key"]] = r
        for sp, role in pairs:
            k = cache_key(sp)
            if k in by_key:
                roles[k].add(role)
    out = []
    for k, r in by_key.items():
        if k in roles:
            out.append({**r, "roles": sorted(roles[k])})
    summary = {"tuned": {f"{o}|{w}": lr for (o, w), lr in tuned.items()}, "counts": counts, "complete": complete}
    return out, summary


__all__ = ["DATA_SEED_OFFSET", "SuiteSettings", "TUNING_REPLICATE", "budget", "evaluation_specs", "replicate",
           "run_protocol", "tuning_specs"]
