"""ServerApp: the strategy of the run config over the digits task; results JSON + accuracy plot."""
from __future__ import annotations

from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from distopt.federated import serve, write_results
from task import make_task

app = ServerApp()

SERVER_LR = {"fedopt": "lr", "fedadam": "eta", "fedyogi": "eta", "fedadagrad": "eta",
             "fedavgm": "server_learning_rate", "scaffold": "global_lr"}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg: Any = context.run_config
    strategy = str(cfg.get("strategy", "fedavg"))
    server_optimizer = str(cfg.get("server-optimizer", "")) or None
    server_hparams = {}
    if float(cfg.get("server-lr", 0.0)) > 0 and strategy in SERVER_LR:
        server_hparams[SERVER_LR[strategy]] = float(cfg["server-lr"])
    run = serve(grid, context, make_task(cfg), strategy=strategy, server_optimizer=server_optimizer,
                num_rounds=int(cfg.get("num-server-rounds", 10)), fraction_train=float(cfg.get("fraction-train", 1.0)),
                min_available_nodes=int(cfg.get("min-nodes", 2)), seed=int(cfg.get("seed", 0)),
                server_hparams=server_hparams, progress=True)
    paths = write_results(run, str(cfg.get("results-dir", "fed_results")))
    print("wrote", ", ".join(map(str, paths)))
