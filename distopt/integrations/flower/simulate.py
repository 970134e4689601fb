"""``simulate``: run distopt's ClientApp and ServerApp on Flower's simulation runtime (Ray).

    from distopt.federated import DigitsTask, simulate
    run = simulate(DigitsTask(partition="dirichlet:0.5"), clients=100, rounds=10,
                   optimizer="lion", server_optimizer="adamw", lr=1e-3, server_lr=1e-2)
    run.accuracy, run.failures, run.weights_digest()

``flwr.simulation.run_simulation`` starts Ray (``init_args``: ``num_cpus`` or the ``address`` of
a running cluster) and a pool of actors, each holding ``client_cpus`` CPUs (and ``client_gpus``
GPUs); a virtual SuperNode per client is served by whichever actor is free. The ServerApp runs in
a thread of this process, so its :class:`~.server.FedRun` is returned directly.

Multi-node: start Ray on the head (``ray start --head --port 6379``) and on every worker
(``ray start --address HEAD:6379``), then pass ``ray_address="auto"`` (or ``HEAD:6379``) from the
head: actors spread over the cluster (``distopt`` and the task's module must be importable on
every node). A real deployment uses the same apps under a SuperLink and SuperNodes; see
``examples/federated_app/``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from distopt.integrations.flower._deps import require
from distopt.integrations.flower.client import make_client_app
from distopt.integrations.flower.server import FedRun, make_server_app


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Flower logs every round at INFO; keep WARNING and above unless ``verbose``."""
    logger = logging.getLogger("flwr")
    old = logger.level
    if not verbose:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def backend_config(num_cpus: int | None = None, client_cpus: float = 1, client_gpus: float = 0.0,
                   ray_address: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray ``backend_config``: per-client resources and ``ray.init`` arguments."""
    init: dict[str, Any] = {"include_dashboard": False, "log_to_driver": bool(verbose)}
    if not verbose:
        init["logging_level"] = logging.ERROR
    if ray_address:
        init["address"] = ray_address
    else:
        init["num_cpus"] = int(num_cpus or os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}, "init_args": init}


def simulate(
    task: Any, *, clients: int = 10, rounds: int = 3, strategy: str = "fedavg", optimizer: str = "adamw",
    server_optimizer: str | None = None, local_steps: int = 10, fraction_train: float = 1.0,
    fraction_evaluate: float | None = None, seed: int = 0, num_cpus: int | None = None, client_cpus: float = 1,
    client_gpus: float = 0.0, ray_address: str | None = None, dp: Any = None,
    client_dp: Mapping[str, Any] | None = None,
    zo: Any = None, hparams: Mapping[str, Any] | None = None, server_hparams: Mapping[str, Any] | None = None,
    progress: Any = False, keep_zo_log: bool = False, out: str | Path | None = None, verbose: bool = False,
) -> FedRun:
    """Simulate ``clients`` clients for ``rounds`` rounds; returns the run (and writes
    ``results.json`` + ``accuracy.png`` under ``out`` when given)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    simulation = require("flwr.simulation")
    if clients < 2:
        raise ValueError(f"clients must be >= 2 (Flower strategies sample at least 2), got {clients}")
    client_app = make_client_app(task, optimizer, local_steps, dp=dp, zo=zo, seed=seed, **dict(hparams or {}))
    server_app = make_server_app(
        task, strategy, server_optimizer, rounds, fraction_train, fraction_evaluate=fraction_evaluate,
        min_available_nodes=clients, seed=seed, client_dp=client_dp, progress=progress, keep_zo_log=keep_zo_log,
        server_hparams=dict(server_hparams or {}),
    )
    run: FedRun = server_app.distopt_run
    spec = client_app.distopt_spec
    run.settings.update(clients=clients, optimizer=optimizer if spec.zo is None else spec.zo.optimizer,
                        local_steps=local_steps, hparams=dict(hparams or {}), task=repr(task),
                        dp=None if spec.dp is None else repr(spec.dp), zo=None if spec.zo is None else repr(spec.zo),
                        client_cpus=client_cpus, num_cpus=num_cpus, ray_address=ray_address)
    start = time.perf_counter()
    with _quiet(verbose):
        simulation.run_simulation(server_app=server_app, client_app=client_app, num_supernodes=clients,
                                  backend_config=backend_config(num_cpus, client_cpus, client_gpus, ray_address,
                                                                verbose),
                                  verbose_logging=verbose)
    run.settings["simulation_wall_time_s"] = time.perf_counter() - start
    if not run.rounds and rounds > 0:
        raise RuntimeError("the simulation ended without completing a round (see Flower's log above)")
    if out is not None:
        write_results(run, out)
    return run


def write_results(run: FedRun, out: str | Path, title: str | None = None) -> list[Path]:
    """``results.json`` and (with matplotlib) ``accuracy.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json"]
    paths[0].write_text(json.dumps(run.to_dict(), indent=2, default=_json_default))
    plot = plot_accuracy({run.settings.get("strategy", "run"): run}, out / "accuracy.png", title)
    return paths + ([plot] if plot else [])


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return repr(obj)


def plot_accuracy(runs: Mapping[str, FedRun], path: str | Path, title: str | None = None) -> Path | None:
    """Accuracy of the global model per round, one line per run (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run in runs.items():
        xs = [0] + [r["round"] for r in run.rounds]
        ys = [run.initial.get("accuracy", math.nan)] + run.accuracy
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (centralized)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["backend_config", "plot_accuracy", "simulate", "write_results"]
