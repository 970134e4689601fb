"""``make_client_app``: a Flower ClientApp that trains a :class:`~.task.Task` with any distopt recipe.

One message = one round of one client (Flower's Message API, ``flwr.clientapp.ClientApp`` with
``@app.train()`` / ``@app.evaluate()`` / ``@app.query()``):

1. the global weights of the ``"arrays"`` ArrayRecord are loaded into ``task.build_model()``;
2. the client's data is ``task.load_partition(partition-id, num-partitions)`` (node config),
   batched by a DataLoader whose shuffling, like torch's global RNG, is seeded from
   ``(seed, server-round, partition-id)``, so a rerun is bit-identical;
3. ``local_steps`` steps of ``distopt.create(optimizer, ..., **hparams)`` run through
   ``task.train``, with the round's scenario operators put in front of the recipe's T stage:
   FedProx's :class:`~distopt.scenarios.fedprox.ProximalTerm` when the server sends
   ``proximal-mu`` (Flower's ``FedProx`` does), SCAFFOLD's
   :class:`~distopt.scenarios.scaffold.ScaffoldCorrection` when it sends a ``scaffold-c``
   ArrayRecord; sample-level DP wraps the result in Opacus (:mod:`.dp`); ``zo=`` replaces the
   recipe by a zeroth-order recipe of :mod:`distopt.zo` that records its steps (:mod:`.zo`);
4. the reply carries the new weights (``"arrays"``), or with ZO only the step scalars
   (``"zo"``) and the recipe's header (``"zo-header"``: name, hyperparameters, seed), a
   MetricRecord (``num-examples``, the task's metrics, ``epsilon`` under DP) and a ConfigRecord
   ``"distopt"`` with the partition id, which the server uses to order
   replies (aggregation in a fixed order is what makes runs bit-identical).

Client state between rounds (SCAFFOLD's ``c_i``, the DP accountant) lives in ``Context.state``.
A client whose code raises is reported by Flower as an error reply; the server's strategy
aggregates the others and records the failure.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import distopt
from distopt.core.chain import Chain
from distopt.core.operator import Operator, Stage
from distopt.integrations.flower._deps import require
from distopt.integrations.flower.dp import SampleDP, epsilon, load_history, make_private_client, save_history
from distopt.integrations.flower.zo import ZO_HEADER, ZO_RECORD, ZOConfig, encode_log, make_zo_optimizer, mix_seed
from distopt.scenarios.fedprox import ProximalTerm
from distopt.scenarios.scaffold import ScaffoldCorrection

META = "distopt"  # ConfigRecord of every reply: {"partition-id": int}
SCAFFOLD_C = "scaffold-c"  # server -> client: the server control variate c
SCAFFOLD_DC = "scaffold-dc"  # client -> server: c_i^+ - c_i
SCAFFOLD_STATE = "scaffold-ci"  # the client's own c_i, in Context.state


# ------------------------------------------------------------------ local optimizer with scenario operators
def with_scenario_operators(recipe: Chain, operators: Sequence[Operator]) -> Chain:
    """``recipe`` with ``operators`` (stage T) inserted after its leading E operators."""
    ops = list(recipe)
    cut = next((i for i, op in enumerate(ops) if op.stage > Stage.E), len(ops))
    return Chain(*ops[:cut], *operators, *ops[cut:])


def federated_optimizer(name: str, params: Any, operators: Sequence[Operator] = (), **hparams: Any) -> Any:
    """``distopt.create(name, params, **hparams)``, with T ``operators`` prepended to its recipe.

    The recipe class is subclassed on the fly (same hyperparameters, validation and ``step``);
    its fast route is turned off so the chain, operators included, is what runs.
    """
    base = distopt.get(name)
    if not operators:
        return base(params, **hparams)
    ops = tuple(operators)

    def recipe(cls: type, group: Mapping[str, Any]) -> Chain:
        return with_scenario_operators(base.recipe(group), ops)

    def fast_route(cls: type, group: Mapping[str, Any]) -> None:
        return None

    sub = type(f"Federated{base.__name__}", (base,), {
        "recipe": classmethod(recipe), "fast_route": classmethod(fast_route), "__module__": __name__,
    })
    return sub(params, **hparams)


# ------------------------------------------------------------------ conversions
def arrays_to_model(model: nn.Module, record: Any) -> None:
    """Load an ArrayRecord (a state_dict by name) into ``model`` (strict)."""
    state = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}
    model.load_state_dict(state, strict=True)


def model_to_arrays(model: nn.Module) -> Any:
    flwr_app = require("flwr.app")
    return flwr_app.ArrayRecord({k: flwr_app.Array(v.detach().cpu().numpy()) for k, v in model.state_dict().items()})


def numpy_record(arrays: Mapping[str, np.ndarray]) -> Any:
    flwr_app = require("flwr.app")
    return flwr_app.ArrayRecord({k: flwr_app.Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def message_bytes(message: Any) -> int:
    """Payload size of a Message as Flower counts it: sum of ``count_bytes()`` of its records
    (ArrayRecord: serialized array bytes + key lengths; Metric/ConfigRecord: 8 bytes per number)."""
    return int(sum(record.count_bytes() for record in message.content.values()))


# ------------------------------------------------------------------ the client spec and its handlers
@dataclass
class ClientSpec:
    """What every round of a distopt client does (see :func:`make_client_app`)."""

    task: Any
    optimizer: str = "adamw"
    local_steps: int = 10
    hparams: dict[str, Any] = field(default_factory=dict)
    dp: SampleDP | None = None
    zo: ZOConfig | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.local_steps, int) and self.local_steps >= 1):
            raise ValueError(f"local_steps must be an integer >= 1, got {self.local_steps!r}")
        if self.dp is not None and self.zo is not None:
            raise ValueError("dp= with zo=: sample-level DP for zeroth-order clients is DP-ZO "
                             "(distopt.privacy.make_private_zo), not wired into the federated client yet")
        if self.zo is None:
            distopt.get(self.optimizer)  # unknown name -> ValueError listing the catalogue


_PARTITIONS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()


def _partition(task: Any, pid: int, num: int) -> Any:
    """``task.load_partition`` cached per process (a Ray actor serves many clients)."""
    key = (type(task).__module__, type(task).__qualname__, repr(task), pid, num)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = task.load_partition(pid, num)
        while len(_PARTITIONS) > 4096:
            _PARTITIONS.popitem(last=False)
    _PARTITIONS.move_to_end(key)
    return _PARTITIONS[key]


def _node(context: Any) -> tuple[int, int]:
    cfg = context.node_config
    return int(cfg.get("partition-id", 0)), int(cfg.get("num-partitions", 1))


def _config(message: Any) -> Mapping[str, Any]:
    records = message.content.config_records
    return records["config"] if "config" in records else {}


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def scaffold_control_update(
    c_local: Mapping[str, Tensor], c_global: Mapping[str, Tensor], x: Mapping[str, Tensor],
    y: Mapping[str, Tensor], steps: int, lr: float,
) -> dict[str, Tensor]:
    """SCAFFOLD option II (Karimireddy et al. 2020, Alg. 1 line 12):
    ``c_i^+ = c_i - c + (x - y_i) / (K η_l)``; with ``K = 0`` (no data) ``c_i`` is unchanged."""
    if steps == 0 or lr == 0:
        return {k: v.clone() for k, v in c_local.items()}
    return {k: c_local[k] - c_global[k] + (x[k] - y[k]) / (steps * lr) for k in c_local}


def client_train(message: Any, context: Any, spec: ClientSpec) -> Any:
    """The ``@app.train()`` handler of :func:`make_client_app` (usable in your own ClientApp)."""
    flwr_app = require("flwr.app")
    cfg = _config(message)
    rnd, seed = int(cfg.get("server-round", 0)), int(cfg.get("distopt-seed", spec.seed))
    steps = int(cfg.get("local-steps", spec.local_steps))
    pid, num = _node(context)

    model = spec.task.build_model()
    arrays_to_model(model, message.content["arrays"])
    dataset = _partition(spec.task, pid, num)
    n = len(dataset)
    names = [k for k, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    anchor = {k: p.detach().clone() for k, p in zip(names, params)}

    torch.manual_seed(mix_seed(seed, rnd, pid, 1))
    loader: Any = DataLoader(dataset, batch_size=getattr(spec.task, "batch_size", 32), shuffle=True,
                             generator=torch.Generator().manual_seed(mix_seed(seed, rnd, pid, 2))) if n else []

    operators: list[Operator] = []
    mu = float(cfg.get("proximal-mu", 0.0))
    if mu > 0:
        operators.append(ProximalTerm(mu, {p: anchor[k] for k, p in zip(names, params)}))
    scaffold = SCAFFOLD_C in message.content.array_records
    if scaffold:
        c_global = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in message.content[SCAFFOLD_C].items()}
        state = context.state
        c_local = ({k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in state[SCAFFOLD_STATE].items()}
                   if SCAFFOLD_STATE in state.array_records else {k: torch.zeros_like(v) for k, v in c_global.items()})
        operators.append(ScaffoldCorrection({p: c_global[k] - c_local[k] for k, p in zip(names, params)}))

    if spec.zo is not None:
        if operators:
            raise ValueError("zo clients support FedAvg-style strategies only (no FedProx / SCAFFOLD operators)")
        optimizer = make_zo_optimizer(params, spec.zo, seed=mix_seed(seed, rnd, pid, 3))
    else:
        optimizer = federated_optimizer(spec.optimizer, params, operators, **spec.hparams)

    metrics: dict[str, float] = {}
    train_model, train_opt, train_data = model, optimizer, loader
    history_after: Callable[[], list] | None = None
    if spec.dp is not None and n > 0:
        train_model, train_opt, train_data, history_after = make_private_client(
            model, optimizer, loader, spec.dp, load_history(context.state))
    if n > 0:
        metrics.update(_floats(spec.task.train(train_model, train_opt, train_data, steps)))
    k_steps = steps if n > 0 else 0

    content: dict[str, Any] = {}
    if spec.zo is not None:
        zo_arrays, zo_header = encode_log(optimizer.log)
        content[ZO_RECORD] = numpy_record(zo_arrays)
        content[ZO_HEADER] = flwr_app.ConfigRecord(zo_header)
    else:
        content["arrays"] = model_to_arrays(model)
    if spec.dp is not None:
        history = history_after() if history_after is not None else load_history(context.state)
        save_history(context.state, history)
        metrics["epsilon"] = epsilon(history, spec.dp.delta)
    if scaffold:
        y = {k: p.detach() for k, p in zip(names, params)}
        lr = float(optimizer.param_groups[0]["lr"])
        c_new = scaffold_control_update(c_local, c_global, anchor, y, k_steps, lr)
        context.state[SCAFFOLD_STATE] = numpy_record({k: v.numpy() for k, v in c_new.items()})
        content[SCAFFOLD_DC] = numpy_record({k: (c_new[k] - c_local[k]).numpy() for k in c_new})
    metrics["num-examples"] = n
    content["metrics"] = flwr_app.MetricRecord(metrics)
    content[META] = flwr_app.ConfigRecord({"partition-id": pid})
    return flwr_app.Message(flwr_app.RecordDict(content), reply_to=message)


def client_evaluate(message: Any, context: Any, spec: ClientSpec) -> Any:
    """The ``@app.evaluate()`` handler: the task's metrics on the client's own partition."""
    flwr_app = require("flwr.app")
    pid, num = _node(context)
    model = spec.task.build_model()
    arrays_to_model(model, message.content["arrays"])
    dataset = _partition(spec.task, pid, num)
    metrics = _floats(spec.task.evaluate(model, dataset)) if len(dataset) else {}
    metrics["num-examples"] = len(dataset)
    return flwr_app.Message(flwr_app.RecordDict({
        "metrics": flwr_app.MetricRecord(metrics), META: flwr_app.ConfigRecord({"partition-id": pid}),
    }), reply_to=message)


def client_query(message: Any, context: Any) -> Any:
    """The ``@app.query()`` handler: tells the server this node's partition id."""
    flwr_app = require("flwr.app")
    pid, _ = _node(context)
    return flwr_app.Message(flwr_app.RecordDict({META: flwr_app.ConfigRecord({"partition-id": pid})}), reply_to=message)


def make_client_app(
    task: Any, optimizer: str = "adamw", local_steps: int = 10, dp: Any = None, zo: Any = None, *,
    seed: int = 0, **hparams: Any,
) -> Any:
    """A ``flwr.clientapp.ClientApp`` whose clients train ``task`` with the distopt recipe ``optimizer``.

    ``hparams`` go to the recipe (``lr=``, ``betas=``, ...). ``dp``: a :class:`~.dp.SampleDP`
    (or dict / True) for sample-level DP-SGD per client; ``zo``: a :class:`~.zo.ZOConfig` (or
    dict / True) for zeroth-order clients (any ``zeroth_order`` recipe, ``zo_sgd`` by default)
    that upload only the seed and the step scalars. ``seed`` is the
    fallback when the server does not send ``distopt-seed`` (distopt's ServerApp does).
    """
    clientapp = require("flwr.clientapp")
    spec = ClientSpec(task, optimizer, local_steps, dict(hparams), SampleDP.of(dp), ZOConfig.of(zo), seed)
    app = clientapp.ClientApp()

    @app.train()
    def train(message: Any, context: Any) -> Any:
        return client_train(message, context, spec)

    @app.evaluate()
    def evaluate(message: Any, context: Any) -> Any:
        return client_evaluate(message, context, spec)

    @app.query()
    def query(message: Any, context: Any) -> Any:
        return client_query(message, context)

    app.distopt_spec = spec  # type: ignore[attr-defined]
    return app


__all__ = [
    "ClientSpec", "arrays_to_model", "client_evaluate", "client_query", "client_train", "federated_optimizer",
    "make_client_app", "message_bytes", "model_to_arrays", "scaffold_control_update", "with_scenario_operators",
]
