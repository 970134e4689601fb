"""distopt on Flower: federated learning with any distopt recipe, on the client and on the server.

    from distopt.federated import DigitsTask, make_client_app, make_server_app, simulate

- :func:`make_client_app` (:mod:`.client`): a Flower ``ClientApp`` training a Flower-free
  :class:`~.task.Task` with any catalogue recipe; FedProx and SCAFFOLD enter as distopt T
  operators; sample-level DP with ε carried across rounds (:mod:`.dp`); zeroth-order clients
  (any :mod:`distopt.zo` recipe) that upload only the seed and the step scalars (:mod:`.zo`).
- :func:`make_server_app` (:mod:`.server`): a Flower ``ServerApp`` running Flower's strategies
  (reproducible, failure-tolerant, ZO-aware), the generalized FedOpt (any distopt recipe on the
  pseudo-gradient; FedAdam / FedYogi / FedAdagrad as in Reddi et al. 2021), SCAFFOLD, and
  client-level DP through Flower's DP wrapper (:mod:`.strategies`).
- :func:`simulate` (:mod:`.simulate`): both on Flower's Ray simulation runtime; results JSON and
  an accuracy plot. ``distopt fed simulate`` is its command line.
- :mod:`.partition`: IID / Dirichlet / pathological splits with flwr-datasets.

Needs the ``fl`` extra (``pip install "distopt[fl]"``: flwr[simulation], flwr-datasets, ray).
"""
from __future__ import annotations

from distopt.integrations.flower._deps import require

require("flwr")

from distopt.integrations.flower.client import (  # noqa: E402
    ClientSpec, client_evaluate, client_train, federated_optimizer, make_client_app, message_bytes,
    scaffold_control_update,
)
from distopt.integrations.flower.dp import SampleDP  # noqa: E402
from distopt.integrations.flower.partition import Partitions, partition_arrays, parse_scheme  # noqa: E402
from distopt.integrations.flower.server import FedRun, make_server_app, serve  # noqa: E402
from distopt.integrations.flower.simulate import backend_config, plot_accuracy, simulate, write_results  # noqa: E402
from distopt.integrations.flower.strategies import (  # noqa: E402
    STRATEGIES, DistoptStrategy, FedOpt, Scaffold, build_strategy, reddi_recipe, reddi_strategy,
)
from distopt.integrations.flower.task import DigitsTask, Task, closure_for, cycle_batches  # noqa: E402
from distopt.integrations.flower.zo import ZOConfig, decode_log, encode_log, replay_into  # noqa: E402

__all__ = [
    "STRATEGIES", "ClientSpec", "DigitsTask", "DistoptStrategy", "FedOpt", "FedRun", "Partitions", "SampleDP",
    "Scaffold", "Task", "ZOConfig", "decode_log", "encode_log", "backend_config", "build_strategy", "client_evaluate",
    "client_train", "closure_for", "cycle_batches", "federated_optimizer", "make_client_app", "make_server_app",
    "message_bytes", "parse_scheme", "partition_arrays", "plot_accuracy", "reddi_recipe", "reddi_strategy",
    "replay_into", "scaffold_control_update", "serve", "simulate", "write_results",
]
