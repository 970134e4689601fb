"""Steps-to-target of zeroth-order fine-tuning vs AdamW on the example task (``distopt bench zo --convergence``).

Task: :mod:`distopt.zo.lm_task` (the task of ``examples/zo_finetune_llm.py``): a LLaMA-architecture
causal LM from a config, random init, on generated arithmetic text, character tokens. Seed ``s``
fixes the text, the init, the batch order and the ZO directions; every method and lr of a seed
starts from the same weights and sees the same batches.

Methods: ``adamw`` (``torch.optim.AdamW``, backprop) and zeroth-order recipes (default ``zo_sgd``
= MeZO, Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", NeurIPS 2023, and
``zo_adam``), each on a small lr grid (:data:`DEFAULT_LRS`, ×3 apart, chosen so that the best lr
of the default task is inside the grid; ``zo_sgd`` at 3e-3 diverges), constant lr, ``eps = 1e-3``,
for a fixed budget of steps (AdamW reaches the target in a few steps, so its budget is smaller).
The held-out loss (first 256 held-out rows) is evaluated at step 0 and every
``k = max(1, budget // evals)`` steps (defaults: AdamW every step, ZO every 10).

Rule (stated in the output): the target of seed ``s`` is ``target_fraction`` × its initial
held-out loss (default 0.8: a loss both AdamW and the ZO recipes reach within their budgets).
Steps-to-target is the first evaluation step whose loss is ≤ the target (``None``: not reached;
resolution ``k`` steps). Forward-equivalents to target: ZO counts the closure calls (2 per step for
two-sided SPSA with n = 1; exact for any recipe), AdamW 3 per step (a backward ≈ 2 forwards).
Wall time to target counts training steps only (not evaluation). Over seeds: the median
(``inf`` = not reached counts as largest). Per method the best lr is the one with the fewest
steps to target (ties, or none reached: the lowest final loss); the ratios ZO/AdamW compare
best lr to best lr (an equal tuning budget per method).
"""
from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distopt.bench import pyplot
from distopt.bench.stats import median

REFERENCE = "adamw"
ADAMW_FORWARD_EQUIVALENTS = 3.0
DEFAULT_METHODS = ("adamw", "zo_sgd", "zo_adam")
DEFAULT_LRS: dict[str, tuple[float, ...]] = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "zo_sgd": (3e-4, 1e-3, 3e-3),
    "zo_adam": (3e-4, 1e-3, 3e-3),
    "zo_sgd_momentum": (3e-5, 1e-4, 3e-4),
}
Progress = Callable[[str], None]


@dataclass
class ConvergenceConfig:
    """What to run; ``lrs`` overrides :data:`DEFAULT_LRS` per method."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    lrs: dict[str, tuple[float, ...]] = field(default_factory=dict)
    steps: int = 100                # AdamW budget
    zo_steps: int = 1000            # budget of every ZO recipe
    evals: int = 100                # evaluations per run (every budget // evals steps)
    target_fraction: float = 0.8
    seeds: int = 1
    hidden: int = 64
    layers: int = 2
    length: int = 24
    batch: int = 16
    eps: float = 1e-3
    n: int = 1
    eval_examples: int = 256
    device: str = "cpu"

    def grid(self, method: str) -> tuple[float, ...]:
        if method in self.lrs:
            return tuple(self.lrs[method])
        if method not in DEFAULT_LRS:
            raise ValueError(f"no default lr grid for {method!r}; give one (lrs={{{method!r}: (...)}}, CLI "
                             f"--lrs {method}=1e-3,3e-3); defaults exist for {', '.join(DEFAULT_LRS)}")
        return DEFAULT_LRS[method]

    def budget(self, method: str) -> int:
        return self.steps if method == REFERENCE else self.zo_steps

    def eval_every(self, method: str) -> int:
        return max(1, self.budget(method) // self.evals)


def check_config(cfg: ConvergenceConfig) -> None:
    """Clear errors naming the argument and what is allowed."""
    import distopt

    for m in cfg.methods:
        if m != REFERENCE and (m not in distopt.available() or distopt.get(m).closure_kind != "forward"):
            raise ValueError(f"methods: {m!r} is neither 'adamw' nor a zeroth-order recipe "
                             f"({', '.join(distopt.available('zeroth_order'))})")
        if not cfg.grid(m) or any(not lr > 0 for lr in cfg.grid(m)):
            raise ValueError(f"lrs[{m!r}] must be a non-empty list of positive numbers, got {cfg.grid(m)}")
    extra = sorted(set(cfg.lrs) - set(cfg.methods))
    if extra:
        raise ValueError(f"lrs given for {extra}, which are not among the methods {list(cfg.methods)}")
    for name in ("steps", "zo_steps", "evals", "seeds", "hidden", "layers", "length", "batch", "n", "eval_examples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not 0.0 < cfg.target_fraction < 1.0:
        raise ValueError(f"target_fraction must be in (0, 1), got {cfg.target_fraction}")


class _Task:
    """One seed's model factory, stacked training rows and evaluation batch."""

    def __init__(self, cfg: ConvergenceConfig, seed: int) -> None:
        from distopt.zo.lm_task import build_task, eval_batch, stack

        self.cfg, self.seed = cfg, seed
        model, train, held_out = build_task(cfg.hidden, cfg.layers, cfg.length, seed)
        self.vocab_size = model.config.vocab_size
        self.train = stack(train, range(len(train)), cfg.device)
        self.eval = eval_batch(held_out, cfg.device, cfg.eval_examples)

    def model(self) -> torch.nn.Module:
        """A fresh copy of the task's model (the same seeded init as :func:`build_task`'s)."""
        from distopt.zo.lm_task import llama_from_config

        return llama_from_config(self.vocab_size, self.cfg.hidden, self.cfg.layers, self.seed).to(self.cfg.device)

    def batches(self) -> Callable[[], dict[str, torch.Tensor]]:
        """Random batches without replacement within an epoch, the same sequence for every run of the seed."""
        g = torch.Generator().manual_seed(self.seed)
        rows = len(self.train["input_ids"])
        order: list[int] = []

        def nxt() -> dict[str, torch.Tensor]:
            nonlocal order
            if len(order) < self.cfg.batch:
                order = torch.randperm(rows, generator=g).tolist()
            idx, order = order[:self.cfg.batch], order[self.cfg.batch:]
            sel = torch.tensor(idx, device=self.cfg.device)
            return {k: v[sel] for k, v in self.train.items()}
        return nxt

    def loss(self, model: torch.nn.Module) -> float:
        was = model.training
        model.eval()
        with torch.no_grad():
            value = float(model(**self.eval).loss)
        model.train(was)
        return value


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(task: _Task, method: str, lr: float, say: Progress) -> dict[str, Any]:
    """Train one (method, lr) for its budget: the held-out curve with cumulative steps, forward
    passes (forward-equivalents for AdamW) and training seconds at each evaluation."""
    import distopt

    cfg = task.cfg
    model, batches = task.model(), task.batches()
    budget, every = cfg.budget(method), cfg.eval_every(method)
    calls = [0]
    if method == REFERENCE:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr)

        def step(b: dict[str, torch.Tensor]) -> None:
            opt.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            opt.step()
            calls[0] += 1
        per_call = ADAMW_FORWARD_EQUIVALENTS
    else:
        model.eval()                        # as MeZO: the probes at θ ± εz see the same function
        opt = distopt.create(method, model.parameters(), lr=lr, eps=cfg.eps, n=cfg.n, seed=task.seed)

        def step(b: dict[str, torch.Tensor]) -> None:
            def closure() -> torch.Tensor:
                calls[0] += 1
                return model(**b).loss
            opt.step(closure)
        per_call = 1.0
    curve = {"step": [0], "loss": [task.loss(model)], "forward": [0.0], "seconds": [0.0]}
    seconds, diverged, report = 0.0, False, budget / 4
    for s in range(1, budget + 1):
        b = batches()
        _sync(cfg.device)
        t0 = time.perf_counter()
        step(b)
        _sync(cfg.device)
        seconds += time.perf_counter() - t0
        if s % every == 0 or s == budget:
            loss = task.loss(model)
            for key, value in (("step", s), ("loss", loss), ("forward", calls[0] * per_call), ("seconds", seconds)):
                curve[key].append(value)
            diverged = not math.isfinite(loss)
            if diverged or s >= report or s == budget:
                report = s + budget / 4
                say(f"  {method} lr={lr:g} seed={task.seed}: step {s}/{budget} held-out loss {loss:.4f} "
                    f"({seconds:.1f} s training)" + (" diverged, stopped" if diverged else ""))
            if diverged:
                break
    return {"method": method, "lr": lr, "seed": task.seed, "params": sum(p.numel() for p in model.parameters()),
            "eval_every": every, "budget": budget, "diverged": diverged, **curve}


def first_reach(run: dict[str, Any], target: float) -> int | None:
    """Index of the first evaluation with loss ≤ target (``None`` if none)."""
    return next((i for i, v in enumerate(run["loss"]) if v <= target), None)


def _at_target(run: dict[str, Any], target: float) -> dict[str, Any]:
    i = first_reach(run, target)
    return {key + "_to_target": (None if i is None else run[key][i]) for key in ("step", "forward", "seconds")}


def _med(values: list[Any]) -> float | None:
    m = median([math.inf if v is None else float(v) for v in values])
    return None if not math.isfinite(m) else m


def _cell(method: str, lr: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over seeds of one (method, lr)."""
    finals = [r["loss"][-1] for r in runs]
    reached = sum(r["step_to_target"] is not None for r in runs)
    return {"method": method, "lr": lr, "seeds": len(runs), "reached": reached,
            "final_loss": statistics.fmean(finals) if all(map(math.isfinite, finals)) else math.nan,
            "min_loss": statistics.fmean(min(r["loss"]) for r in runs),
            "steps_to_target": _med([r["step_to_target"] for r in runs]),
            "forward_to_target": _med([r["forward_to_target"] for r in runs]),
            "seconds_to_target": _med([r["seconds_to_target"] for r in runs]),
            "eval_every": runs[0]["eval_every"], "budget": runs[0]["budget"]}


def _best(cells: list[dict[str, Any]]) -> dict[str, Any]:
    def key(c: dict[str, Any]) -> tuple[float, float]:
        final = c["final_loss"] if math.isfinite(c["final_loss"]) else math.inf
        return (math.inf if c["steps_to_target"] is None else c["steps_to_target"], final)
    return min(cells, key=key)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best lr per method and its ratios to AdamW's best (None where either did not reach)."""
    methods = list(dict.fromkeys(c["method"] for c in cells))
    best = {m: _best([c for c in cells if c["method"] == m]) for m in methods}
    ref = best.get(REFERENCE)
    out = []
    for m in methods:
        row = dict(best[m])
        for key in ("steps", "forward", "seconds"):
            row[f"{key}_ratio"] = _ratio(row[f"{key}_to_target"], ref[f"{key}_to_target"]) if ref else None
        out.append(row)
    return out


def target_rule(fraction: float) -> str:
    return (f"target = {fraction:g} x the seed's initial held-out loss; steps to target = first evaluation step "
            f"with held-out loss <= target; forward-equivalents: ZO = closure calls (2/step), AdamW = 3/step")


def bench_zo_convergence(cfg: ConvergenceConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run every method × lr × seed; return ``config``, ``rule``, ``targets``, ``runs`` (curves),
    ``grid`` (per method and lr, medians over seeds) and ``summary`` (best lr per method, ratios)."""
    check_config(cfg)
    say = progress or (lambda _s: None)
    runs, targets = [], {}
    for seed in range(cfg.seeds):
        task = _Task(cfg, seed)
        for m in cfg.methods:
            for lr in cfg.grid(m):
                say(f"{m} lr={lr:g} seed={seed}: {cfg.budget(m)} steps, held-out loss every {cfg.eval_every(m)}")
                run = run_one(task, m, lr, say)
                targets.setdefault(seed, cfg.target_fraction * run["loss"][0])
                run.update(target=targets[seed], **_at_target(run, targets[seed]))
                runs.append(run)
    cells = [_cell(m, lr, [r for r in runs if r["method"] == m and r["lr"] == lr])
             for m in cfg.methods for lr in cfg.grid(m)]
    return {"config": asdict(cfg), "rule": target_rule(cfg.target_fraction), "targets": targets, "runs": runs,
            "grid": cells, "summary": summarize(cells)}


def write_outputs(result: dict[str, Any], out: str | Path) -> list[Path]:
    """``zo_convergence.json`` and, with matplotlib, ``zo_convergence.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "zo_convergence.json"
    path.write_text(json.dumps(_json_safe(result), indent=1), encoding="utf-8")
    files = [path]
    if plot(result, out / "zo_convergence.png"):
        files.append(out / "zo_convergence.png")
    return files


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def plot(result: dict[str, Any], path: Path) -> bool:
    """Held-out loss vs step and vs forward-equivalents (log x), mean over seeds; best lr bold."""
    plt = pyplot()
    if plt is None:
        return False

    best = {(r["method"], r["lr"]) for r in result["summary"]}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, cell in enumerate(result["grid"]):
        runs = [r for r in result["runs"] if r["method"] == cell["method"] and r["lr"] == cell["lr"]]
        n = min(len(r["loss"]) for r in runs)
        loss = [statistics.fmean(r["loss"][j] for r in runs) for j in range(1, n)]
        is_best = (cell["method"], cell["lr"]) in best
        color = colors[list(dict.fromkeys(c["method"] for c in result["grid"])).index(cell["method"]) % len(colors)]
        for ax, key in zip(axes, ("step", "forward")):
            ax.plot(runs[0][key][1:n], loss, color=color, lw=2.0 if is_best else 0.8, ls="-" if is_best else "--",
                    alpha=1.0 if is_best else 0.5, label=f"{cell['method']} lr={cell['lr']:g}")
    target = statistics.fmean(result["targets"].values())
    label = "target" + (" (mean over seeds)" if len(result["targets"]) > 1 else "")
    for ax, xlabel in zip(axes, ("step", "forward-equivalents (AdamW: 3/step)")):
        ax.axhline(target, color="k", lw=0.8, ls=":", label=label)
        ax.set(xscale="log", xlabel=xlabel)
    axes[0].set(ylabel="held-out loss", title="ZO vs AdamW, example task")
    finite = [v for r in result["runs"] for v in r["loss"] if math.isfinite(v)]
    axes[0].set_ylim(0.9 * min(finite), 1.15 * max(r["loss"][0] for r in result["runs"]))  # diverged: off the top
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["ADAMW_FORWARD_EQUIVALENTS", "ConvergenceConfig", "DEFAULT_LRS", "DEFAULT_METHODS", "REFERENCE",
           "bench_zo_convergence", "check_config", "first_reach", "plot", "run_one", "summarize", "target_rule",
           "write_outputs"]
