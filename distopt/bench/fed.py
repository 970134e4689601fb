"""``distopt bench fed``: federated optimization on Flower's Ray simulation runtime (digits MLP).

Accuracy table: for every partition (IID, Dirichlet α) and variant, the rounds needed to reach
``--target`` test accuracy (centralized, after each round), the final accuracy, the uplink bytes
per client per round (measured on the reply Messages) and the wall time per round. Variants:

- ``fedavg``: clients SGD (lr 0.3), server FedAvg;
- ``fedadam``: same clients, server FedAdam (Reddi et al. 2021; η = 0.03, τ = 1e-3);
- ``scaffold``: same clients with SCAFFOLD control variates (option II), η_g = 1;
- ``zo``: zeroth-order clients (``zo_sgd`` = MeZO, lr 0.04, ε = 1e-3) uploading only (seed, scalars)
  pairs, server replay + FedAvg;
- ``dp``: FedAvg with sample-level DP-SGD per client (σ = 1.0, C = 1.0, δ = 1e-5; ε reported);
- optional: ``dp-client`` (client-level DP, σ = 0.3, C = 1.0), ``fedprox`` (μ = 0.01),
  ``fedyogi``, ``fedopt-adamw`` (server AdamW, lr 0.01).

Scale table: wall time per round of FedAvg at 10, 100 and 1000 simulated clients with
``--scale-clients-per-round`` clients sampled per round (fraction = k/N; all of them at N = 10),
excluding round 1 (which includes Ray actor start-up and the partition-id discovery, reported
separately).

Every run is one ``flwr.simulation.run_simulation`` (Ray starts and stops each time; its
start-up is in ``simulation_wall_time_s`` but not in the per-round times).
Output under ``--out``: ``runs.jsonl``, ``report.md`` and ``accuracy_<partition>.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from distopt.bench.table import render_table

CLIENT = {"optimizer": "sgd", "hparams": {"lr": 0.3}}
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg": {**CLIENT, "strategy": "fedavg"},
    "fedadam": {**CLIENT, "strategy": "fedadam", "server_hparams": {"eta": 0.03, "tau": 1e-3}},
    "scaffold": {**CLIENT, "strategy": "scaffold", "server_hparams": {"global_lr": 1.0}},
    "zo": {"strategy": "fedavg", "optimizer": "sgd", "zo": {"optimizer": "zo_sgd", "lr": 0.04, "eps": 1e-3}},
    "dp": {**CLIENT, "strategy": "fedavg", "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}},
    "dp-client": {**CLIENT, "strategy": "fedavg", "client_dp": {"noise_multiplier": 0.3, "clipping_norm": 1.0}},
    "fedprox": {**CLIENT, "strategy": "fedprox", "server_hparams": {"proximal_mu": 0.01}},
    "fedyogi": {**CLIENT, "strategy": "fedyogi", "server_hparams": {"eta": 0.03}},
    "fedopt-adamw": {**CLIENT, "strategy": "fedopt", "server_optimizer": "adamw",
                     "server_hparams": {"lr": 0.01, "weight_decay": 0.0}},
}


def _names(text: str, known: Any, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if known is not None and n not in known]
    if bad:
        raise SystemExit(f"error: unknown {what} {bad}; choose from {', '.join(known)}")
    return names


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def summarize(run: Any, target: float) -> dict[str, Any]:
    rounds = run.rounds
    later = rounds[1:] if len(rounds) > 1 else rounds
    eps = [r.get("epsilon_max") for r in rounds if r.get("epsilon_max") is not None]
    return {
        "rounds_to_target": run.rounds_to_target(target),
        "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
        "best_accuracy": max((r.get("accuracy", 0.0) for r in rounds), default=None),
        "uplink_bytes_per_client": _mean([r.get("uplink_bytes_mean") for r in rounds]),
        "uplink_bytes_per_round": _mean([float(r.get("uplink_bytes_total", 0)) for r in rounds]),
        "round_time_s": _mean([r.get("time_s") for r in later]),
        "round1_time_s": rounds[0].get("time_s") if rounds else None,
        "discovery_s": rounds[0].get("discovery_s") if rounds else None,
        "clients_per_round": _mean([float(r.get("received", 0)) for r in rounds]),
        "failures": len(run.failures),
        "epsilon": eps[-1] if eps else run.client_dp_epsilon,
        "simulation_wall_time_s": run.settings.get("simulation_wall_time_s"),
        "weights_sha256": run.weights_digest()[:16],
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _bytes(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} B" if v < 10_000 else f"{v / 1024:.1f} KiB"


def run(args: argparse.Namespace) -> int:
    from distopt.integrations.flower import DigitsTask, plot_accuracy, simulate

    if args.quick:
        args.variants, args.partitions, args.rounds = "fedavg,zo", "iid", min(args.rounds, 3)
        args.scale = "10,100" if args.scale else ""
        args.scale_rounds = min(args.scale_rounds, 2)
    variants = _names(args.variants, VARIANTS, "variant")
    partitions = _names(args.partitions, None, "partition")
    scale = [int(n) for n in _names(args.scale, None, "scale")] if args.scale else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = (out / "runs.jsonl").open("w")
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    runs_by_partition: dict[str, dict[str, Any]] = {}
    for partition in partitions:
        for variant in variants:
            spec = dict(VARIANTS[variant])
            print(f"[bench fed] {partition} / {variant}: {args.clients} clients x {args.rounds} rounds ...",
                  file=sys.stderr, flush=True)
            task = DigitsTask(partition=partition, seed=args.seed)
            fed = simulate(task, clients=args.clients, rounds=args.rounds, local_steps=args.local_steps,
                           seed=args.seed, num_cpus=args.num_cpus, **spec)
            row = {"table": "accuracy", "partition": partition, "variant": variant, "clients": args.clients,
                   "rounds": args.rounds, **summarize(fed, args.target), "settings": fed.settings,
                   "per_round": fed.rounds}
            rows.append(row)
            runs_by_partition.setdefault(partition, {})[variant] = fed
            jsonl.write(json.dumps(row, default=repr) + "\n")
            jsonl.flush()
    scale_rows: list[dict[str, Any]] = []
    for n in scale:
        per_round = min(n, args.scale_clients_per_round)
        fraction = 1.0 if per_round >= n else per_round / n
        print(f"[bench fed] scale: {n} clients, {per_round} per round x {args.scale_rounds} rounds ...",
              file=sys.stderr, flush=True)
        task = DigitsTask(partition="iid", seed=args.seed)
        fed = simulate(task, clients=n, rounds=args.scale_rounds, local_steps=args.local_steps, seed=args.seed,
                       num_cpus=args.num_cpus, fraction_train=fraction, **VARIANTS["fedavg"])
        row = {"table": "scale", "clients": n, "fraction_train": fraction, "rounds": args.scale_rounds,
               **summarize(fed, args.target), "settings": fed.settings, "per_round": fed.rounds}
        scale_rows.append(row)
        jsonl.write(json.dumps(row, default=repr) + "\n")
        jsonl.flush()
    jsonl.close()

    acc_cols = ["partition", "variant", f"rounds to {args.target:.2f}", "final acc", "uplink/client/round",
                "uplink/round", "s/round", "ε"]
    acc_rows = [[r["partition"], r["variant"], _fmt(r["rounds_to_target"]) if r["rounds_to_target"] else
                 f"> {r['rounds']}", _fmt(r["final_accuracy"], ".4f"), _bytes(r["uplink_bytes_per_client"]),
                 _bytes(r["uplink_bytes_per_round"]), _fmt(r["round_time_s"], ".2f"), _fmt(r["epsilon"], ".2f")]
                for r in rows]
    title = (f"federated digits MLP (64-32-10): {args.clients} clients, {args.rounds} rounds, "
             f"{args.local_steps} local steps, batch 32; target accuracy {args.target}")
    if acc_rows:
        render_table(acc_cols, acc_rows, title=title, plain=args.plain)
    sc_cols = ["clients", "sampled/round", "s/round (rounds 2+)", "round 1 s", "discovery s", "simulation s"]
    sc_rows = [[r["clients"], _fmt(r["clients_per_round"], ".0f"), _fmt(r["round_time_s"], ".2f"),
                _fmt(r["round1_time_s"], ".2f"), _fmt(r["discovery_s"], ".2f"),
                _fmt(r["simulation_wall_time_s"], ".1f")] for r in scale_rows]
    if sc_rows:
        render_table(sc_cols, sc_rows, title="wall time per round, FedAvg on Flower's Ray backend", plain=args.plain)
    plots = []
    for partition, runs in runs_by_partition.items():
        path = plot_accuracy(runs, out / f"accuracy_{partition.replace(':', '_')}.png",
                             title=f"digits, {args.clients} clients, partition {partition}")
        if path:
            plots.append(path.name)
    _markdown(out / "report.md", title, acc_cols, acc_rows, sc_cols, sc_rows, plots, args)
    print(f"{len(rows) + len(scale_rows)} simulations in {time.perf_counter() - start:.1f} s; wrote {out}/runs.jsonl, "
          f"{out}/report.md" + (f", {', '.join(plots)}" if plots else ""))
    return 0


def _md_table(cols: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(path: Path, title: str, acc_cols, acc_rows, sc_cols, sc_rows, plots, args) -> None:
    parts = ["# distopt bench fed", "", f"Command: `distopt bench fed {' '.join(sys.argv[3:])}`", "", title, ""]
    if acc_rows:
        parts += [_md_table(acc_cols, acc_rows), ""]
    if sc_rows:
        parts += [f"## Wall time per round ({args.scale_clients_per_round} clients sampled per round, "
                  f"{args.scale_rounds} rounds, FedAvg)", "", _md_table(sc_cols, sc_rows), ""]
    parts += [f"![{p}]({p})" for p in plots]
    parts += ["", "Uplink = bytes of the reply Messages (Flower's `count_bytes`: serialized arrays + keys, "
              "8 bytes per metric). s/round excludes round 1 (Ray actor start-up and partition discovery)."]
    path.write_text("\n".join(parts) + "\n")
