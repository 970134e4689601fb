"""``distopt fed simulate`` (federated simulation on Flower's Ray backend) and ``distopt bench fed``.

    distopt fed simulate --clients 100 --rounds 10 --partition dirichlet:0.5 \\
        --optimizer lion --lr 3e-4 --server-optimizer adamw --server-lr 1e-2 --num-cpus 2 --out fed_results

Prints one progress line per round, writes ``results.json`` and ``accuracy.png`` under ``--out``.
``--ray-address auto`` joins a running Ray cluster (``ray start --head`` on one node, ``ray start
--address HEAD:6379`` on the others) instead of starting a local one. The work is in
:mod:`distopt.integrations.flower` and :mod:`distopt.bench.fed`; imports are deferred so that
``distopt --help`` does not import Flower.
"""
from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

FL_HINT = 'distopt fed needs Flower; install it with: pip install "distopt[fl]"'


def _kv(items: list[str] | None) -> dict[str, Any]:
    """``["momentum=0.9", "betas=(0.9,0.99)"]`` -> dict with Python literals (strings as is)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip().replace("-", "_")] = value
    return out


def _pair(text: str | None, names: tuple[str, str], default_second: float) -> dict[str, float] | None:
    """``"1.0:2.0"`` -> {names[0]: 1.0, names[1]: 2.0}; ``"1.0"`` uses ``default_second``."""
    if text is None:
        return None
    first, _, second = text.partition(":")
    return {names[0]: float(first), names[1]: float(second) if second else default_second}


SERVER_LR_NAME = {"fedopt": "lr", "fedadam": "eta", "fedyogi": "eta", "fedadagrad": "eta",
                  "fedavgm": "server_learning_rate", "scaffold": "global_lr"}


def cmd_simulate(args: argparse.Namespace) -> int:
    try:
        from distopt.integrations.flower import DigitsTask, simulate
    except ImportError:
        print(f"error: {FL_HINT}", file=sys.stderr)
        return 2
    strategy = args.strategy or ("fedopt" if args.server_optimizer else "fedavg")
    hparams = _kv(args.hparam)
    if args.lr is not None:
        hparams["lr"] = args.lr
    server_hparams = _kv(args.server_hparam)
    if args.server_lr is not None:
        if strategy not in SERVER_LR_NAME:
            print(f"error: --server-lr has no meaning for strategy {strategy!r}", file=sys.stderr)
            return 2
        server_hparams[SERVER_LR_NAME[strategy]] = args.server_lr
    zo = None
    if args.zo:
        zo = {"optimizer": args.zo_optimizer, "lr": args.zo_lr, "eps": args.zo_eps, "n": args.zo_directions}
    task = DigitsTask(partition=args.partition, seed=args.seed, hidden=tuple(args.hidden), batch_size=args.batch_size)
    print(f"distopt fed simulate: {args.clients} clients, {args.rounds} rounds, {args.partition}, strategy {strategy}"
          f"{' + ' + args.server_optimizer if args.server_optimizer else ''}, clients train with "
          f"{args.zo_optimizer + ' (seed + scalar uploads)' if zo else args.optimizer} x {args.local_steps} steps",
          flush=True)
    try:
        run = simulate(
            task, clients=args.clients, rounds=args.rounds, strategy=strategy, optimizer=args.optimizer,
            server_optimizer=args.server_optimizer, local_steps=args.local_steps, fraction_train=args.fraction_train,
            seed=args.seed, num_cpus=args.num_cpus, client_cpus=args.client_cpus, client_gpus=args.client_gpus,
            ray_address=args.ray_address, dp=_pair(args.dp, ("noise_multiplier", "max_grad_norm"), 1.0),
            client_dp=_pair(args.client_dp, ("noise_multiplier", "clipping_norm"), 1.0), zo=zo,
            hparams=hparams, server_hparams=server_hparams, progress=True, out=args.out, verbose=args.verbose,
        )
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    final = run.rounds[-1] if run.rounds else {}
    print(f"final accuracy {final.get('accuracy', float('nan')):.4f} after {len(run.rounds)} rounds; "
          f"{len(run.failures)} client failures; {run.settings['simulation_wall_time_s']:.1f} s; "
          f"weights sha256 {run.weights_digest()[:16]}")
    if run.client_dp_epsilon is not None:
        print(f"client-level DP: ε = {run.client_dp_epsilon:.3f} (δ = 1e-5, no sampling amplification)")
    print(f"wrote {args.out}/results.json and {args.out}/accuracy.png")
    return 0


def cmd_bench_fed(args: argparse.Namespace) -> int:
    try:
        import flwr  # noqa: F401  (only checks that the extra is installed)
    except ImportError:
        print(f"error: {FL_HINT}", file=sys.stderr)
        return 2
    from distopt.bench.fed import run

    return run(args)


def add_commands(top: argparse._SubParsersAction, bench: argparse._SubParsersAction) -> None:
    p_fed = top.add_parser("fed", help="federated learning on Flower: `distopt fed simulate ...`")
    fed_sub = p_fed.add_subparsers(dest="fed_command", required=True)
    p = fed_sub.add_parser("simulate", help="simulate clients on Flower's Ray backend (MLP on digits)")
    p.add_argument("--clients", type=int, default=10, help="number of simulated clients (default 10)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | pathological:K (default iid)")
    p.add_argument("--strategy", default=None,
                   help="fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, fedmedian, fedtrimmedavg, krum, "
                        "scaffold or fedopt (default fedavg; fedopt when --server-optimizer is given)")
    p.add_argument("--optimizer", default="adamw", help="client recipe, any `distopt list` name (default adamw)")
    p.add_argument("--lr", type=float, default=None, help="client learning rate (default: the recipe's)")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE", help="client hyperparameter (repeatable)")
    p.add_argument("--server-optimizer", default=None, help="server recipe for fedopt (any `distopt list` name)")
    p.add_argument("--server-lr", type=float, default=None,
                   help="server step size (lr of fedopt, eta of fedadam/yogi/adagrad, global_lr of scaffold)")
    p.add_argument("--server-hparam", action="append", metavar="KEY=VALUE",
                   help="server hyperparameter, e.g. tau=1e-3, proximal_mu=0.01, server_momentum=0.9 (repeatable)")
    p.add_argument("--local-steps", type=int, default=10, help="optimizer steps per client per round (default 10)")
    p.add_argument("--batch-size", type=int, default=32, help="client batch size (default 32)")
    p.add_argument("--hidden", type=int, nargs="*", default=[32], help="MLP hidden widths (default 32)")
    p.add_argument("--fraction-train", type=float, default=1.0, help="fraction of clients per round (default 1)")
    p.add_argument("--dp", metavar="SIGMA[:C]", default=None, help="sample-level DP-SGD per client (noise σ, clip C)")
    p.add_argument("--client-dp", metavar="SIGMA[:C]", default=None,
                   help="client-level DP: server clips updates to C, adds noise σC/m (Flower's wrapper)")
    p.add_argument("--zo", action="store_true", help="zeroth-order clients uploading (seed, scalar) pairs only")
    p.add_argument("--zo-optimizer", default="zo_sgd",
                   help="zeroth-order recipe of the clients (`distopt list --family zeroth_order`; default zo_sgd)")
    p.add_argument("--zo-lr", type=float, default=0.04, help="ZO step size (default 0.04)")
    p.add_argument("--zo-eps", type=float, default=1e-3, help="ZO perturbation (default 1e-3)")
    p.add_argument("--zo-directions", type=int, default=1, help="ZO directions per step (default 1)")
    p.add_argument("--seed", type=int, default=0, help="one seed for data split, init, sampling, batches, noise")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument("--client-cpus", type=float, default=1, help="CPUs per simulated client (default 1)")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per simulated client (default 0)")
    p.add_argument("--ray-address", default=None, help="join a running Ray cluster ('auto' or HEAD:6379)")
    p.add_argument("--out", default="fed_results", help="output directory (default fed_results/)")
    p.add_argument("--verbose", action="store_true", help="Flower's and Ray's INFO logs")
    p.set_defaults(func=cmd_simulate)

    b = bench.add_parser("fed", help="federated: FedAvg / FedAdam / SCAFFOLD / ZO / DP under IID and Dirichlet; "
                                     "uplink bytes; wall time per round at 10/100/1000 clients")
    b.add_argument("--variants", default="fedavg,fedadam,scaffold,zo,dp",
                   help="comma-separated from fedavg, fedadam, scaffold, zo, dp, dp-client, fedprox, fedyogi, "
                        "fedopt-adamw (default fedavg,fedadam,scaffold,zo,dp)")
    b.add_argument("--partitions", default="iid,dirichlet:0.5,dirichlet:0.1", help="comma-separated schemes")
    b.add_argument("--clients", type=int, default=10, help="clients in the accuracy runs (default 10)")
    b.add_argument("--rounds", type=int, default=15, help="rounds of the accuracy runs (default 15)")
    b.add_argument("--local-steps", type=int, default=10, help="local steps per round (default 10)")
    b.add_argument("--target", type=float, default=0.85, help="accuracy for rounds-to-target (default 0.85)")
    b.add_argument("--scale", default="10,100,1000", help="client counts for the wall-time table ('' to skip)")
    b.add_argument("--scale-clients-per-round", type=int, default=10,
                   help="clients sampled per round in the wall-time runs (default 10: fraction = 10/N)")
    b.add_argument("--scale-rounds", type=int, default=3, help="rounds of each wall-time run (default 3)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--num-cpus", type=int, default=None, help="CPUs Ray may use (default: all)")
    b.add_argument("--quick", action="store_true", help="tiny run: fedavg+zo, iid only, 3 rounds, scale 10,100")
    b.add_argument("--out", default="bench_results/fed", help="output directory (default bench_results/fed)")
    b.add_argument("--plain", action="store_true", help="plain text tables even if rich is installed")
    b.set_defaults(func=cmd_bench_fed)
