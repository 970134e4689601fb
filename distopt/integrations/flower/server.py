"""``make_server_app``: a Flower ServerApp running a strategy over a :class:`~.task.Task`.

The ServerApp's ``main(grid, context)`` (:func:`serve`) builds the initial model from the task,
the strategy by name (:func:`~.strategies.build_strategy`), and runs Flower's
``Strategy.start`` for ``num_rounds``; after every round it evaluates the global model on
``task.load_centralized()`` (when the task has one) and records, per round: wall time, accuracy
and loss, sampled / received clients, failures (with the error Flower reported), uplink bytes
per client (from the reply Messages) and ε where DP is on. Everything lands in a
:class:`FedRun`, attached to the app as ``app.distopt_run``: in a simulation the ServerApp runs
in a thread of the calling process, so the caller reads it after ``run_simulation`` returns.
"""
from __future__ import annotations

import hashlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch

from distopt.integrations.flower._deps import require
from distopt.integrations.flower.client import arrays_to_model, model_to_arrays
from distopt.integrations.flower.dp import epsilon as rdp_epsilon
from distopt.integrations.flower.strategies import build_strategy, inner
from distopt.integrations.flower.zo import mix_seed


@dataclass
class FedRun:
    """Results of one federated run (JSON-able through :meth:`to_dict`)."""

    settings: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    final_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    zo_log: list[dict[str, Any]] = field(default_factory=list)
    client_dp_epsilon: float | None = None
    wall_time_s: float = 0.0

    @property
    def accuracy(self) -> list[float]:
        return [r.get("accuracy", math.nan) for r in self.rounds]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [dict(f, round=r["round"]) for r in self.rounds for f in r.get("failures", [])]

    def weights_digest(self) -> str:
        """SHA-256 over the final weights (names, dtypes, shapes, bytes): equal digests = bit-identical."""
        h = hashlib.sha256()
        for k in sorted(self.final_arrays):
            a = np.ascontiguousarray(self.final_arrays[k])
            h.update(f"{k}|{a.dtype}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def rounds_to_target(self, target: float) -> int | None:
        return next((r["round"] for r in self.rounds if r.get("accuracy", -1.0) >= target), None)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("final_arrays")
        out["final_weights_sha256"] = self.weights_digest()
        out["final_accuracy"] = self.rounds[-1].get("accuracy") if self.rounds else None
        out["failures"] = self.failures
        return out


def _print_progress(row: Mapping[str, Any]) -> None:
    acc = f"acc {row['accuracy']:.4f}" if "accuracy" in row else "acc -"
    loss = f"loss {row['loss']:.4f}" if "loss" in row else ""
    up = row.get("uplink_bytes_mean")
    parts = [f"round {row['round']:>3}/{row['num_rounds']}", acc, loss,
             f"clients {row.get('received', 0)}/{row.get('sampled', 0)}",
             f"failed {len(row.get('failures', []))}",
             f"uplink {up / 1024:.2f} KiB/client" if up is not None else "uplink -",
             f"{row.get('time_s', 0.0):.2f} s"]
    if "epsilon_max" in row:
        parts.append(f"ε {row['epsilon_max']:.3f}")
    print("  ".join(p for p in parts if p), file=sys.stdout, flush=True)


def serve(
    grid: Any, context: Any, task: Any, *, strategy: str = "fedavg", server_optimizer: Any = None, num_rounds: int = 3,
    fraction_train: float = 1.0, fraction_evaluate: float | None = None, min_available_nodes: int | None = None,
    seed: int = 0, local_steps: int | None = None, client_dp: Mapping[str, Any] | None = None,
    server_hparams: Mapping[str, Any] | None = None, run: FedRun | None = None,
    progress: bool | Callable[[Mapping[str, Any]], None] = False, keep_zo_log: bool = False, timeout: float = 3600,
    discover: bool | str = "auto",
) -> FedRun:
    """The body of distopt's ServerApp ``main``; usable in your own ``@app.main()``."""
    flwr_app = require("flwr.app")
    run = run if run is not None else FedRun()
    start = time.perf_counter()
    np.random.seed(mix_seed(seed, 7) % 2**32)  # Flower's DP wrappers draw their noise from numpy's global RNG
    model = task.build_model()
    initial = model_to_arrays(model)
    if min_available_nodes is None:
        min_available_nodes = max(2, len(list(grid.get_node_ids())))
    centralized = task.load_centralized() if hasattr(task, "load_centralized") else None
    if fraction_evaluate is None:
        fraction_evaluate = 0.0 if centralized is not None else 1.0
    strat = build_strategy(strategy, task=task, server_optimizer=server_optimizer, server_hparams=server_hparams,
                           fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                           min_available_nodes=min_available_nodes, seed=seed, client_dp=client_dp,
                           discover=discover)
    core = inner(strat)
    core.keep_zo_log = keep_zo_log
    report = progress if callable(progress) else (_print_progress if progress else None)
    run.settings.update(strategy=strategy, server_optimizer=server_optimizer if isinstance(server_optimizer, str) else
                        (None if server_optimizer is None else repr(server_optimizer)),
                        server_hparams=getattr(core, "server_hparams", None) or dict(server_hparams or {}),
                        num_rounds=num_rounds, fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                        min_available_nodes=min_available_nodes, seed=seed, client_dp=dict(client_dp or {}) or None)

    def evaluate_fn(server_round: int, arrays: Any) -> Any:
        now = time.perf_counter()
        row: dict[str, Any] = {"round": server_round, "num_rounds": num_rounds}
        if server_round > 0:
            log = core.rounds.get(server_round, {})
            row.update({k: v for k, v in log.items() if k not in ("start", "uplink_bytes")})
            ups = log.get("uplink_bytes", [])
            row["uplink_bytes_mean"] = float(np.mean(ups)) if ups else None
            row["uplink_bytes_max"] = int(max(ups)) if ups else None
            row["uplink_bytes_total"] = int(sum(ups))
            row["time_s"] = now - log.get("start", now)
        metrics: dict[str, float] = {}
        if centralized is not None:
            arrays_to_model(model, arrays)
            with torch.no_grad():
                metrics = {k: float(v) for k, v in task.evaluate(model, centralized).items()}
            row.update(metrics)
        if server_round == 0:
            run.initial = metrics
        else:
            run.rounds.append(row)
            if report is not None:
                report(row)
        return flwr_app.MetricRecord(metrics) if metrics else None

    train_config = flwr_app.ConfigRecord({"local-steps": int(local_steps)} if local_steps else {})
    result = strat.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds, timeout=timeout,
                         train_config=train_config, evaluate_config=flwr_app.ConfigRecord(), evaluate_fn=evaluate_fn)
    core.resolve_failures(grid)
    final = result.arrays if len(result.arrays) else initial
    run.final_arrays = {k: a.numpy() for k, a in final.items()}
    run.zo_log = list(core.zo_log)
    if client_dp:
        released = sum(1 for r in run.rounds if r.get("received", 0) > 0 and not r.get("failures"))
        sigma = float(dict(client_dp).get("noise_multiplier", 1.0))
        delta = float(dict(client_dp).get("delta", 1e-5))
        # no amplification by sampling (q = 1): the accounting Flower's fixed-clipping wrapper supports
        run.client_dp_epsilon = rdp_epsilon([(sigma, 1.0, released)], delta) if sigma > 0 else math.inf
    run.wall_time_s = time.perf_counter() - start
    return run


def make_server_app(
    task: Any, strategy: str = "fedavg", server_optimizer: Any = None, num_rounds: int = 3,
    fraction_train: float = 1.0, **kwargs: Any,
) -> Any:
    """A ``flwr.serverapp.ServerApp`` running ``strategy`` for ``num_rounds`` over ``task``.

    ``strategy``: fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, fedmedian,
    fedtrimmedavg, krum, scaffold, or fedopt with ``server_optimizer=<any distopt name>`` (a
    server optimizer with strategy fedavg means fedopt). Keyword arguments: those of
    :func:`serve` (``fraction_evaluate``, ``min_available_nodes``, ``seed``, ``local_steps``,
    ``client_dp``, ``progress``, ``keep_zo_log``, ``timeout``, ``discover``); any other keyword
    is a server hyperparameter (``lr=`` of the server optimizer, ``eta=``/``tau=`` of FedAdam,
    ``proximal_mu=``, ``server_momentum=``, ``global_lr=`` of SCAFFOLD, ...). Results:
    ``app.distopt_run``.
    """
    serverapp = require("flwr.serverapp")
    serve_keys = {"fraction_evaluate", "min_available_nodes", "seed", "local_steps", "client_dp", "progress",
                  "keep_zo_log", "timeout", "discover"}
    serve_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in serve_keys}
    server_hparams = dict(kwargs.pop("server_hparams", {}) or {})
    server_hparams.update(kwargs)
    build_strategy(strategy, task=None if strategy != "scaffold" else task, server_optimizer=server_optimizer,
                   server_hparams=dict(server_hparams), seed=0)  # validate names and hyperparameters now
    app = serverapp.ServerApp()
    run = FedRun()
    app.distopt_run = run  # type: ignore[attr-defined]

    @app.main()
    def main(grid: Any, context: Any) -> None:
        serve(grid, context, task, strategy=strategy, server_optimizer=server_optimizer, num_rounds=num_rounds,
              fraction_train=fraction_train, server_hparams=server_hparams, run=run, **serve_kwargs)

    return app


__all__ = ["FedRun", "make_server_app", "serve"]
