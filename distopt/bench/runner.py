"""One benchmark run, its record, the results cache and the (parallel) executor.

A run (:class:`RunSpec`) trains a fresh model of a workload with one optimizer at one learning rate
for ``budget`` steps (a schedule scales the lr: linear warm-up over 5 % then cosine decay to 10 %,
or constant after the warm-up), from an *init* seed and a separate *data-order* seed, through
``optimizer.step(closure)`` (so optimizers that re-evaluate the loss work). Every ``eval_every``
steps the training clock is paused and the validation metric is computed; at the end the test
metric. The record holds the config, the environment, the seeds, the curves and the metrics:

- ``final_val``, ``final_test`` (and ``test_loss``): the workload's metric after the last step;
- ``state_bytes_per_param``: ``distopt.state_bytes(opt) / #params`` after training;
- ``step_overhead``: time inside ``step()`` but outside the closure, over total training time;
- ``peak_memory_bytes``: CUDA ``max_memory_allocated`` during the run (above what the data held);
  on CPU a separate ``memory`` probe of a few steps under
  :class:`~distopt.bench.memory.LiveTensorCounter` (never inside a timed run);
- ``diverged``: a non-finite training or validation loss, or one above ``DIVERGENCE_FACTOR`` (100)
  times the initial validation loss, stops the run, which then scores the
  workload's ``failure_value``; any other exception is recorded in ``error``. Neither stops a suite.

Steps- and time-to-target are computed from the curves by the report (the target depends on
AdamW's results), so the records never go stale when the target moves.

Results are cached one file per run under a key that hashes the config, the workload (with a
hash of its data) and the *code version*: the source of every ``distopt`` module the optimizer's
class reaches through its imports, of distopt's core, of the training loop and the workloads,
plus the torch version. Rerunning skips finished runs; an interrupted suite resumes where it
stopped; editing an optimizer re-runs only that optimizer.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
import pkgutil
import platform
import subprocess
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import distopt
from distopt.bench import optional
from distopt.bench.search_space import round_lr, space
from distopt.bench.workloads import Workload, make_workload

WARMUP = 0.05
FINAL_LR_FRACTION = 0.1
MEMORY_PROBE_STEPS = 3
DIVERGENCE_FACTOR = 100.0
"""A run has diverged when a loss is non-finite or above this multiple of the initial validation loss."""


@dataclass
class RunSpec:
    """Everything that defines a run (the cache key is a hash of this plus the code version)."""

    optimizer: str
    workload: str
    lr: float
    init_seed: int
    data_seed: int
    budget: int
    hparams: dict[str, Any] = field(default_factory=dict)
    lr_keys: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"
    kind: str = "train"  # "train" or "memory" (CPU peak-memory probe)
    device: str = "cpu"
    quick: bool = False
    data: str | None = None

    def config(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    def label(self) -> str:
        tail = f" {self.kind}" if self.kind != "train" else ""
        return f"{self.optimizer} {self.workload} lr={self.lr:g} s={self.init_seed}/{self.data_seed} B={self.budget}{tail}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # dtypes and other objects


# ------------------------------------------------------------------------------------ code version


_ALWAYS = ("distopt.core", "distopt.bench.runner", "distopt.bench.workloads", "distopt.bench.workloads_vision",
           "distopt.bench.workloads_lm", "distopt.bench.mnist1d_data", "distopt.bench.memory")


def _module_closure(roots: Iterable[str]) -> list[str]:
    """``distopt`` modules reachable from ``roots`` through module globals (imports). A root that is
    a package brings all its submodules; a package reached through an import brings only its
    ``__init__``. ``distopt.bench`` modules are followed only when they are roots."""
    seen: set[str] = set()
    todo = [(r, True) for r in roots]
    while todo:
        name, is_root = todo.pop()
        if name in seen or not name.startswith("distopt"):
            continue
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:
            continue
        seen.add(name)
        if is_root and hasattr(module, "__path__"):
            todo += [(m.name, True) for m in pkgutil.iter_modules(module.__path__, name + ".")]
        for key, value in vars(module).items():
            if key.startswith("__"):  # module dunders, and the __import_* globals torch.compile injects
                continue
            ref = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
            if isinstance(ref, str) and ref.startswith("distopt.") and not ref.startswith("distopt.bench"):
                todo.append((ref, False))
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def code_version(optimizer: str, extra: tuple[str, ...] = ()) -> str:
    """A short hash of the source that a run of ``optimizer`` executes (see the module docstring)."""
    roots = list(_ALWAYS) + list(extra)
    if optimizer in distopt.available():
        roots.append(distopt.get(optimizer).__module__)
    h = hashlib.sha256(torch.__version__.encode())
    for name in _module_closure(roots):
        path = getattr(sys.modules[name], "__file__", None)
        if path and os.path.isfile(path):
            h.update(name.encode())
            with open(path, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _optimizer_extra_modules(spec: RunSpec) -> tuple[str, ...]:
    mods = [v for v in spec.hparams.values() if isinstance(v, str) and v in distopt.available()]
    extra = tuple(distopt.get(m).__module__ for m in mods)
    if spec.optimizer.startswith("ablation/"):
        extra += ("distopt.bench.ablation",)
    return extra


@functools.lru_cache(maxsize=None)
def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout distopt is imported from (``+dirty`` if modified), or None."""
    root = Path(distopt.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    env = {"torch": torch.__version__, "python": platform.python_version(), "distopt": distopt.__version__,
           "platform": platform.platform(), "device": device, "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "git": git_revision()}
    if hasattr(os, "getloadavg"):
        env["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


# --------------------------------------------------------------------------------------- workloads


_WORKLOADS: dict[tuple[str, str, bool, str | None], Workload] = {}


def base_workload(name: str, device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    """The workload ``name`` with its own budget, built once per process."""
    key = (name, device, quick, data)
    if key not in _WORKLOADS:
        wl = make_workload(name, device, quick, data)
        wl.fingerprint()  # once: copies made by with_budget() inherit it
        _WORKLOADS[key] = wl
    return _WORKLOADS[key]


def get_workload(spec: RunSpec) -> Workload:
    """The run's workload with the run's budget."""
    wl = base_workload(spec.workload, spec.device, spec.quick, spec.data)
    return wl if spec.budget == wl.budget else wl.with_budget(spec.budget)


def cache_key(spec: RunSpec, workload: Workload | None = None) -> str:
    wl = workload if workload is not None else get_workload(spec)
    payload = {"spec": spec.config(), "workload": _jsonable(wl.config()),
               "code": code_version(spec.optimizer, _optimizer_extra_modules(spec))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# ------------------------------------------------------------------------------------------ training


def param_groups(model: nn.Module, optimizer: str) -> list[dict[str, Any]] | list[nn.Parameter]:
    """Muon gets two groups: hidden matrices (ndim >= 2, not ``embed``/``head``) and the rest with
    ``use_muon=False`` (its AdamW fallback); every other optimizer gets all parameters in one group."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optimizer != "muon":
        return [p for _, p in params]
    hidden = [p for n, p in params if p.ndim >= 2 and not _is_io(n)]
    rest = [p for n, p in params if not (p.ndim >= 2 and not _is_io(n))]
    return [g for g in ({"params": hidden}, {"params": rest, "use_muon": False}) if g["params"]]


def _is_io(name: str) -> bool:
    return name.split(".")[0] in ("embed", "head", "cls_token", "pos_embed")


def create_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    hparams = dict(spec.hparams)
    hparams.update({k: ratio * spec.lr for k, ratio in spec.lr_keys.items()})
    if spec.optimizer.startswith("ablation/"):
        from distopt.bench.ablation import make_optimizer

        return make_optimizer(spec.optimizer, model, spec.lr, hparams)
    return distopt.create(spec.optimizer, param_groups(model, spec.optimizer), lr=spec.lr, **hparams)


def lr_factor(step: int, budget: int, schedule: str) -> float:
    """Multiplier of the base lr at 1-based ``step``: warm-up then cosine (or constant)."""
    warm = max(1, int(WARMUP * budget))
    if step <= warm:
        return step / warm
    if schedule == "constant":
        return 1.0
    progress = (step - warm) / max(1, budget - warm)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


class _Diverged(Exception):
    pass


def _closure_for(opt: torch.optim.Optimizer, model: nn.Module, wl: Workload, batch: Any,
                 clock: dict[str, float], sync: Callable[[], None], timed: bool) -> Callable[[], torch.Tensor]:
    kind = getattr(type(opt), "closure_kind", "backward")

    def closure() -> torch.Tensor:
        t = time.perf_counter()
        if kind == "forward":
            with torch.no_grad():
                loss = wl.loss(model, batch)
        else:
            opt.zero_grad(set_to_none=True)
            loss = wl.loss(model, batch)
            if torch.is_grad_enabled():
                loss.backward(create_graph=kind == "create_graph")
        if timed:
            sync()
            clock["closure"] += time.perf_counter() - t
        return loss.detach()

    return closure


def _eval(opt: torch.optim.Optimizer, model: nn.Module, wl: Workload, split: str) -> dict[str, float]:
    swap = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
    if swap:  # schedule-free: evaluate the averaged point x
        opt.eval()  # type: ignore[attr-defined]
    try:
        return wl.evaluate(model, split)
    finally:
        if swap:
            opt.train()  # type: ignore[attr-defined]


def train(spec: RunSpec, wl: Workload) -> dict[str, Any]:
    """Train once and return ``(curves, metrics)`` as a dict (see the module docstring)."""
    cuda = spec.device.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(spec.device)) if cuda else (lambda: None)
    sample_every = 10 if cuda else 1  # CUDA: time and check the loss on every 10th step only
    if cuda:
        torch.cuda.reset_peak_memory_stats(spec.device)
        base_mem = torch.cuda.memory_allocated(spec.device)
    model = wl.build(spec.init_seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = create_optimizer(spec, model)
    keys = ["lr", *spec.lr_keys]
    bases = [{k: g[k] for k in keys if k in g} for g in opt.param_groups]
    batches = wl.batches(spec.data_seed)
    curve: dict[str, list[float]] = {"step": [], "val": [], "val_loss": [], "train_loss": [], "time_s": []}
    clock = {"train": 0.0, "step": 0.0, "closure": 0.0, "timed_iter": 0.0}
    metrics: dict[str, Any] = {"n_params": n_params, "diverged": False, "diverged_step": None, "steps": 0}
    smooth = math.nan
    limit = [math.inf]

    def record(step: int) -> None:
        ev = _eval(opt, model, wl, "val")
        curve["step"].append(step)
        curve["val"].append(ev["metric"])
        curve["val_loss"].append(ev["loss"])
        curve["train_loss"].append(smooth)
        curve["time_s"].append(clock["train"])
        if not math.isfinite(ev["loss"]) or (curve["val_loss"] and ev["loss"] > limit[0]):
            raise _Diverged(step)

    try:
        record(0)
        limit[0] = DIVERGENCE_FACTOR * max(curve["val_loss"][0], 1e-3)
        for step in range(1, spec.budget + 1):
            t0 = time.perf_counter()
            factor = lr_factor(step, spec.budget, spec.schedule)
            for g, base in zip(opt.param_groups, bases):
                for k, v in base.items():
                    g[k] = v * factor
            batch = next(batches)
            timed = step % sample_every == 0
            if timed:
                sync()
                t1 = time.perf_counter()
                c0 = clock["closure"]
            try:
                out = opt.step(_closure_for(opt, model, wl, batch, clock, sync, timed))
            except FloatingPointError as exc:  # optimizers that refuse non-finite gradients (Shampoo)
                clock["train"] += time.perf_counter() - t0
                raise _Diverged(step) from exc
            if timed:
                sync()
                dt = time.perf_counter() - t1
                clock["timed_iter"] += dt
                clock["step"] += dt - (clock["closure"] - c0)
                loss = math.nan if out is None else float(out)
                if out is not None and not loss <= limit[0]:  # NaN compares False
                    clock["train"] += time.perf_counter() - t0
                    raise _Diverged(step)
                smooth = loss if math.isnan(smooth) else 0.9 * smooth + 0.1 * loss
            clock["train"] += time.perf_counter() - t0
            metrics["steps"] = step
            if step % wl.eval_every == 0 or step == spec.budget:
                sync()
                record(step)
    except _Diverged as exc:
        metrics.update(diverged=True, diverged_step=int(exc.args[0]))
    if metrics["diverged"]:
        metrics.update(final_val=wl.failure_value, final_test=wl.failure_value, test_loss=None)
    else:
        test = _eval(opt, model, wl, "test")
        metrics.update(final_val=curve["val"][-1], final_test=test["metric"], test_loss=test["loss"])
    sb = distopt.state_bytes(opt)
    metrics.update(
        state_bytes=sb, state_bytes_per_param=sb / max(n_params, 1), train_time_s=clock["train"],
        step_time_s=clock["step"] * sample_every,
        step_overhead=clock["step"] / clock["timed_iter"] if clock["timed_iter"] > 0 else None,
        peak_memory_bytes=(torch.cuda.max_memory_allocated(spec.device) - base_mem) if cuda else None,
        memory_method="cuda.max_memory_allocated" if cuda else None,
    )
    return {"curves": curve, "metrics": metrics}


def probe_memory(spec: RunSpec, wl: Workload) -> dict[str, Any]:
    """Peak live tensor bytes over a few training steps (model, gradients, optimizer state, activations)."""
    from distopt.bench.memory import LiveTensorCounter

    batches = wl.batches(spec.data_seed)
    with LiveTensorCounter() as counter:
        model = wl.build(spec.init_seed)
        n_params = sum(p.numel() for p in model.parameters())
        param_bytes = counter.current
        opt = create_optimizer(spec, model)
        clock = {"closure": 0.0}
        for _ in range(MEMORY_PROBE_STEPS):
            opt.step(_closure_for(opt, model, wl, next(batches), clock, lambda: None, False))
        sb = distopt.state_bytes(opt)
    return {"curves": {}, "metrics": {"n_params": n_params, "peak_memory_bytes": counter.peak, "param_bytes": param_bytes,
                                      "state_bytes": sb, "state_bytes_per_param": sb / max(n_params, 1),
                                      "memory_method": f"LiveTensorCounter over {MEMORY_PROBE_STEPS} steps"}}


def run_one(spec: RunSpec, key: str | None = None, code: str | None = None) -> dict[str, Any]:
    """One record (never raises for a failing optimizer: ``error`` holds the exception). ``key`` and
    ``code`` are the cache key and code version computed by the process that owns the cache (a worker
    must not recompute them: the source could have changed since)."""
    wl = get_workload(spec)
    start = time.perf_counter()
    rec: dict[str, Any] = {
        "key": key or cache_key(spec, wl), "config": spec.config(), "workload": _jsonable(wl.config()),
        "code_version": code or code_version(spec.optimizer, _optimizer_extra_modules(spec)),
        "environment": environment(spec.device), "seed": {"init": spec.init_seed, "data": spec.data_seed},
        "curves": {}, "metrics": {}, "error": None,
    }
    try:
        out = probe_memory(spec, wl) if spec.kind == "memory" else train(spec, wl)
        rec.update(out)
    except Exception as exc:  # noqa: BLE001 - one broken optimizer must not stop the suite
        rec["error"] = f"{type(exc).__name__}: {exc}"
    rec["metrics"]["wall_s"] = time.perf_counter() - start
    rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return _jsonable(rec)


# ------------------------------------------------------------------------------------------- cache


class Cache:
    """One JSON file per finished run, ``<dir>/<key>.json``, written atomically."""

    def __init__(self, directory: str | Path | None) -> None:
        self.dir = Path(directory) if directory else None
        if self.dir:
            self.dir.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict[str, Any] | None:
        if not self.dir:
            return None
        path = self.dir / f"{key}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, record: dict[str, Any]) -> None:
        if not self.dir:
            return
        tmp = self.dir / f".{record['key']}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, self.dir / f"{record['key']}.json")


# ----------------------------------------------------------------------------------------- executor


def _code(spec: RunSpec) -> str:
    return code_version(spec.optimizer, _optimizer_extra_modules(spec))


def _worker_init(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


_POOL: dict[tuple[int, int], ProcessPoolExecutor] = {}


def _pool(jobs: int, threads: int) -> ProcessPoolExecutor:
    """A process pool kept between calls (workers keep their workloads loaded); see :func:`close_pool`."""
    import multiprocessing as mp

    key = (jobs, threads)
    if key not in _POOL:
        close_pool()
        _POOL[key] = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                         initializer=_worker_init, initargs=(threads,))
    return _POOL[key]


def close_pool(kill: bool = False) -> None:
    """Shut the worker processes down (``kill``: cancel queued runs and terminate running ones)."""
    for pool in _POOL.values():
        if kill:
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        else:
            pool.shutdown()
    _POOL.clear()


def execute(specs: list[RunSpec], cache: Cache, jobs: int = 1, threads: int = 1, progress: bool = True,
            desc: str = "runs", limit: int | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Records for ``specs`` (cached ones are read, the others run, ``jobs`` at a time, and cached as
    soon as each finishes). ``limit`` stops after that many new runs (to test resuming).
    Returns (records in the order of ``specs``; missing ones left out) and counts."""
    keys = [cache_key(s) for s in specs]
    found = {k: r for k in dict.fromkeys(keys) if (r := cache.get(k)) is not None}
    todo = list({k: s for k, s in zip(keys, specs) if k not in found}.items())
    if limit is not None:
        todo = todo[:limit]
    tqdm = optional("tqdm")
    bar = tqdm.tqdm(total=len(todo), unit="run", desc=desc, disable=not progress or not todo,
                    dynamic_ncols=True, leave=False) if tqdm else None
    done: dict[str, dict[str, Any]] = {}

    def finish(rec: dict[str, Any]) -> None:
        cache.put(rec)
        done[rec["key"]] = rec
        if bar is not None:
            bar.set_postfix_str(rec["config"]["optimizer"] + " " + rec["config"]["workload"], refresh=False)
            bar.update()

    if jobs <= 1 or len(todo) <= 1:
        old = torch.get_num_threads()
        _worker_init(threads)
        try:
            for key, spec in todo:
                finish(run_one(spec, key, _code(spec)))
        finally:
            torch.set_num_threads(old)
    else:
        pool = _pool(jobs, threads)
        try:
            futures = [pool.submit(run_one, spec, key, _code(spec)) for key, spec in todo]
            for fut in as_completed(futures):
                finish(fut.result())
        except BaseException:  # Ctrl-C or a crashed worker: stop now, finished runs are already cached
            close_pool(kill=True)
            raise
    if bar is not None:
        bar.close()
    records = {**found, **done}
    out = [records[k] for k in dict.fromkeys(keys) if k in records]
    return out, {"cached": len(found), "ran": len(done), "total": len(set(keys))}


def select_lr(records: list[dict[str, Any]], higher_is_better: bool) -> float | None:
    """The tuned lr: best final validation metric (diverged and failed runs rank last; ties go to the
    smaller lr)."""
    def score(r: dict[str, Any]) -> float:
        if r.get("error"):
            return -math.inf
        v = r["metrics"].get("final_val")
        if v is None or (isinstance(v, float) and math.isnan(v)) or r["metrics"].get("diverged"):
            return -math.inf
        return v if higher_is_better else -v

    ranked = sorted(records, key=lambda r: (-score(r), r["config"]["lr"]))
    return ranked[0]["config"]["lr"] if ranked else None


def make_spec(optimizer: str, workload: str, lr: float, init_seed: int, data_seed: int, budget: int, *,
              device: str = "cpu", quick: bool = False, data: str | None = None, kind: str = "train",
              hparams: dict[str, Any] | None = None) -> RunSpec:
    """A spec with the optimizer's declared fixed hyperparameters, lr-linked keys and schedule."""
    from distopt.bench.search_space import hparams_for

    s = space(optimizer) if not optimizer.startswith("ablation/") else None
    return RunSpec(
        optimizer, workload, round_lr(lr), init_seed, data_seed, budget,
        hparams=hparams if hparams is not None else (hparams_for(optimizer, device) if s else {}),
        lr_keys=dict(s.lr_keys) if s else {}, schedule=s.schedule if s else "cosine", kind=kind,
        device=device, quick=quick, data=data)


__all__ = ["Cache", "RunSpec", "cache_key", "close_pool", "code_version", "create_optimizer", "environment", "execute",
           "base_workload", "get_workload", "git_revision", "lr_factor", "make_spec", "param_groups", "probe_memory", "run_one",
           "select_lr", "train"]
