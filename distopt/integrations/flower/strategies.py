"""Server strategies: Flower's Message-API strategies made reproducible and ZO-aware, the
generalized FedOpt (any distopt recipe on the server), and SCAFFOLD.

**Deterministic, failure-tolerant, ZO-aware** (:class:`DistoptStrategy`, a mixin put in front
of every Flower strategy used here: ``FedAvg``, ``FedAvgM``, ``FedProx``, ``FedMedian``,
``FedTrimmedAvg``, ``Krum``):

- sampling: Flower samples with the global ``random`` module over an unordered set of node ids
  (random per run); here the node ids are listed in partition-id order and ``random`` is seeded
  from ``(seed, round)`` for the call (its state is restored after), so the same clients train
  in the same round of every run. When only a fraction is sampled, a one-off ``query`` message
  first asks every node for its partition id (``discovery_s`` in the round log);
- aggregation order: replies arrive in completion order; they are sorted by partition id
  before aggregation, so floating-point sums -- hence the weights -- are bit-identical;
- failures: an error reply (the client raised) is logged in :attr:`DistoptStrategy.rounds` with
  its partition id (asked with a ``query`` message if the node never replied) and the round
  completes with the others; a round with no usable reply keeps the model;
- uplink: the bytes of every reply (Flower's ``count_bytes`` over its records) are logged;
- ZO replies (``"zo"``: step scalars, ``"zo-header"``: recipe, hyperparameters, seed) are
  replayed from the weights sent this round (:func:`.zo.replay_into`, i.e.
  :func:`distopt.zo.replay`) into ordinary ``"arrays"`` before aggregation, so every strategy
  aggregates zeroth-order clients.

**FedOpt generalized** (:class:`FedOpt`; Reddi et al., "Adaptive Federated Optimization",
ICLR 2021): the pseudo-gradient ``g_t = w_t - avg_i(w_i)`` is written to ``.grad`` of the
server's copy of the weights and one step of a distopt optimizer runs on it. Any recipe of the
catalogue works (``fedopt`` with ``server_optimizer="adamw" | "lion" | "muon" | ...``).
``fedadam``, ``fedyogi`` and ``fedadagrad`` are the paper's Algorithm 2 exactly, as distopt
chains (:func:`reddi_recipe`): ``x <- x + η m_t / (sqrt(v_t) + τ)``, no bias correction,
``v_{-1} = τ²`` (the paper asks ``v_{-1} >= τ²``). Flower's own ``FedYogi`` / ``FedAdagrad``
start from ``v_{-1} = 0`` (``initial_accumulator=0`` reproduces them); Flower's ``FedAdam``
multiplies η by ``sqrt(1-β2^{t+1}) / (1-β1^{t+1})``, which is not in the paper.

**SCAFFOLD** (:class:`Scaffold`; Karimireddy et al., ICML 2020, Algorithm 1): the server sends
its control variate ``c`` with the weights; clients correct every gradient by ``c - c_i``
(:class:`~distopt.scenarios.scaffold.ScaffoldCorrection`) and return ``y_i`` and
``Δc_i = c_i^+ - c_i`` (option II); the server sets ``x <- x + η_g · mean_i(y_i - x)`` and
``c <- c + |S|/N · mean_i(Δc_i)`` (uniform means, as in the paper).
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

import distopt
from distopt.accumulators.accumulator import SumOfSquares
from distopt.accumulators.moments import FirstMoment
from distopt.accumulators.server_moments import EmaSecondMoment, YogiSecondMoment
from distopt.core.chain import Chain, chain
from distopt.core.hyper import validate
from distopt.core.shell import ChainOptimizer
from distopt.integrations.flower._deps import require
from distopt.integrations.flower.client import (
    META, SCAFFOLD_C, SCAFFOLD_DC, arrays_to_model, message_bytes, numpy_record,
)
from distopt.integrations.flower.zo import ZO_HEADER, ZO_RECORD, mix_seed, replay_into
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.diagonal import RootMomentPreconditioner

flwr_app = require("flwr.app")
flwr_strategy = require("flwr.serverapp.strategy")

STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg",
              "krum", "scaffold", "fedopt")


# ------------------------------------------------------------------ helpers
class _SortedGrid:
    """A Grid whose ``get_node_ids`` lists nodes by (partition id, node id)."""

    def __init__(self, grid: Any, key: Callable[[int], tuple]) -> None:
        self._grid, self._key = grid, key

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=self._key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@contextlib.contextmanager
def _seeded_random(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def _same_metric_keys(replies: list[Any]) -> None:
    """Flower refuses to aggregate replies whose MetricRecords have different keys; a client with
    no data returns only ``num-examples``. Missing metrics are filled with 0.0 (such a client has
    weight 0 in every weighted average)."""
    records = [m.content["metrics"] for m in replies if "metrics" in m.content.metric_records]
    keys = {k for r in records for k in r}
    for r in records:
        for k in keys - set(r):
            r[k] = 0.0


def to_numpy(record: Any) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


# ------------------------------------------------------------------ the mixin
class DistoptStrategy:
    """Reproducible sampling, ordered aggregation, failure and uplink logging, ZO replay.

    Put in front of a Flower strategy class: ``class S(DistoptStrategy, FedAvg)``. Extra
    keyword arguments: ``seed``, ``task`` (needed to replay ZO replies) and ``discover``: ask
    every node its partition id before the first round (``True``), never (``False``), or only
    when a fraction of the nodes is sampled (``"auto"``; with all nodes sampled the ids come with
    the replies, and a failed node that never replied is asked afterwards).
    """

    def __init__(self, *args: Any, seed: int = 0, task: Any = None, discover: bool | str = "auto",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if discover not in (True, False, "auto"):
            raise ValueError(f"discover must be True, False or 'auto', got {discover!r}")
        self.seed, self.task, self.discover = int(seed), task, discover
        self.node_pid: dict[int, int] = {}
        self.rounds: dict[int, dict[str, Any]] = {}
        self.zo_log: list[dict[str, Any]] = []
        self.keep_zo_log = False
        self._current: Any = None
        self._zo_model: torch.nn.Module | None = None

    # -- sampling -------------------------------------------------------------------------
    def _key(self, node_id: int) -> tuple:
        pid = self.node_pid.get(node_id)
        return (0, pid, node_id) if pid is not None else (1, 0, node_id)

    def _wait_for_nodes(self, grid: Any) -> list[int]:
        need = int(getattr(self, "min_available_nodes", 0))
        while len(nodes := list(grid.get_node_ids())) < need:
            time.sleep(0.2)
        return nodes

    def _query(self, grid: Any, nodes: list[int]) -> None:
        """Ask ``nodes`` their partition id (one ``query`` message each)."""
        if not nodes:
            return
        messages = [flwr_app.Message(flwr_app.RecordDict(), message_type=flwr_app.MessageType.QUERY, dst_node_id=n)
                    for n in nodes]
        for reply in grid.send_and_receive(messages, timeout=600):
            if not reply.has_error() and META in reply.content.config_records:
                self.node_pid[reply.metadata.src_node_id] = int(reply.content[META]["partition-id"])

    def resolve_failures(self, grid: Any) -> None:
        """Name the partition of failed nodes that never replied successfully (queried now)."""
        failures = [f for log in self.rounds.values() for f in log["failures"] if f["partition_id"] is None]
        self._query(grid, sorted({f["node_id"] for f in failures} - set(self.node_pid)))
        for f in failures:
            f["partition_id"] = self.node_pid.get(f["node_id"])

    def _sampling(self, grid: Any, fraction: float) -> Any:
        if self.discover is True or (self.discover == "auto" and 0.0 < fraction < 1.0):
            self._query(grid, [n for n in self._wait_for_nodes(grid) if n not in self.node_pid])
        self.resolve_failures(grid)
        return _SortedGrid(grid, self._key)

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        start = time.perf_counter()
        self._current = arrays
        config["distopt-seed"] = self.seed
        sorted_grid = self._sampling(grid, float(getattr(self, "fraction_train", 1.0)))
        discovered = time.perf_counter()
        with _seeded_random(mix_seed(self.seed, server_round, 101)):
            messages = list(super().configure_train(server_round, arrays, config, sorted_grid))  # type: ignore[misc]
        self.rounds[server_round] = {
            "round": server_round, "start": start, "sampled": len(messages), "received": 0, "failures": [],
            "uplink_bytes": [], "num_nodes": len(list(grid.get_node_ids())), "discovery_s": discovered - start,
        }
        return messages

    def configure_evaluate(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        if float(getattr(self, "fraction_evaluate", 1.0)) == 0.0:
            return []
        sorted_grid = self._sampling(grid, float(getattr(self, "fraction_evaluate", 1.0)))
        with _seeded_random(mix_seed(self.seed, server_round, 202)):
            return list(super().configure_evaluate(server_round, arrays, config, sorted_grid))  # type: ignore[misc]

    # -- replies ----------------------------------------------------------------------------
    def prepare_replies(self, server_round: int, replies: Iterable[Any]) -> list[Any]:
        """Log failures and uplink bytes, sort by partition id, replay ZO; the valid replies."""
        log = self.rounds.setdefault(server_round, {"round": server_round, "start": time.perf_counter(), "sampled": 0,
                                                    "received": 0, "failures": [], "uplink_bytes": []})
        valid = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                log["failures"].append({"node_id": node, "partition_id": self.node_pid.get(node),
                                        "reason": str(msg.error.reason)})
                continue
            if META in msg.content.config_records:
                self.node_pid[node] = int(msg.content[META]["partition-id"])
            log["uplink_bytes"].append(message_bytes(msg))
            valid.append(msg)
        valid.sort(key=lambda m: self._key(m.metadata.src_node_id))
        _same_metric_keys(valid)
        log["received"] = len(valid)
        log["partitions"] = [self.node_pid.get(m.metadata.src_node_id) for m in valid]
        eps = [float(m.content["metrics"]["epsilon"]) for m in valid
               if "metrics" in m.content.metric_records and "epsilon" in m.content["metrics"]]
        if eps:
            log["epsilon_max"] = max(eps)
        for msg in valid:
            if ZO_RECORD in msg.content.array_records:
                self._replay_zo(server_round, msg)
        return valid

    def _replay_zo(self, server_round: int, msg: Any) -> None:
        if self.task is None:
            raise RuntimeError("a ZO reply needs the strategy's task= to rebuild the model for the replay")
        if self._zo_model is None:
            self._zo_model = self.task.build_model()
        model = self._zo_model
        arrays_to_model(model, self._current)
        zo = {k: a.numpy() for k, a in msg.content[ZO_RECORD].items()}
        header = dict(msg.content[ZO_HEADER])
        replay_into(list(model.parameters()), zo, header)  # the list the client gave its optimizer
        msg.content["arrays"] = flwr_app.ArrayRecord(
            {k: flwr_app.Array(v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items()})
        del msg.content[ZO_RECORD]
        del msg.content[ZO_HEADER]
        if self.keep_zo_log:
            self.zo_log.append({"round": server_round, "partition_id": self.node_pid.get(msg.metadata.src_node_id),
                                "num_examples": int(msg.content["metrics"]["num-examples"]), "header": header,
                                **{k: v.tolist() for k, v in zo.items()}})

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        valid = self.prepare_replies(server_round, replies)
        weight_key = getattr(self, "weighted_by_key", "num-examples")
        if not valid or all(float(m.content["metrics"].get(weight_key, 0)) == 0 for m in valid):
            return None, None
        return super().aggregate_train(server_round, valid)  # type: ignore[misc]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        valid = [m for m in replies if not m.has_error()]
        valid = [m for m in valid if float(m.content["metrics"].get("num-examples", 0)) > 0]
        valid.sort(key=lambda m: self._key(m.metadata.src_node_id))
        return super().aggregate_evaluate(server_round, valid) if valid else None  # type: ignore[misc]


def _flower(base: type) -> type:
    return type(base.__name__, (DistoptStrategy, base), {"__module__": __name__, "__doc__": base.__doc__})


FedAvg = _flower(flwr_strategy.FedAvg)
FedAvgM = _flower(flwr_strategy.FedAvgM)
FedProx = _flower(flwr_strategy.FedProx)
FedMedian = _flower(flwr_strategy.FedMedian)
FedTrimmedAvg = _flower(flwr_strategy.FedTrimmedAvg)
Krum = _flower(flwr_strategy.Krum)


# ------------------------------------------------------------------ FedOpt with any distopt recipe
def reddi_recipe(rule: str, eta: float, beta_1: float, beta_2: float, tau: float, initial: float) -> Chain:
    """Reddi et al. (2021) Algorithm 2 as a chain on the pseudo-gradient ``g = -Δ``:
    ``v`` by ``rule`` (adam / yogi / adagrad), ``m = β1 m + (1-β1) g``, ``x <- x - η m / (sqrt(v) + τ)``."""
    second = {"adam": EmaSecondMoment(beta_2, initial), "yogi": YogiSecondMoment(beta_2, initial),
              "adagrad": SumOfSquares(initial, key="exp_avg_sq")}[rule]
    return chain(second, FirstMoment(beta_1), RootMomentPreconditioner(tau, key="exp_avg_sq", bias_correct=False),
                 ApplyLR(eta))


class FedOpt(DistoptStrategy, flwr_strategy.FedAvg):
    """FedAvg's average, then one step of a distopt optimizer on ``g = w_t - avg(w_i)``.

    ``server_optimizer``: a catalogue name (``distopt.create(name, params, **server_hparams)``)
    or a callable ``params -> torch.optim.Optimizer``. Non-floating arrays (counters) take the
    average. The optimizer state persists across rounds; the weights are re-read from the
    arrays sent each round (so a wrapper that changes them, e.g. DP noise, is respected).
    """

    def __init__(self, server_optimizer: Any = "sgd", server_hparams: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server_optimizer, self.server_hparams = server_optimizer, dict(server_hparams or {})
        if isinstance(server_optimizer, str):  # fail now on unknown names and hyperparameters
            validate(server_optimizer, distopt.get(server_optimizer).hyperparameters(), self.server_hparams)
        self.params: dict[str, torch.Tensor] | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def _build(self, current: Mapping[str, np.ndarray]) -> None:
        self.params = {k: torch.tensor(v) for k, v in current.items() if np.issubdtype(v.dtype, np.floating)}
        plist = list(self.params.values())
        if callable(self.server_optimizer):
            self.optimizer = self.server_optimizer(plist)
        else:
            self.optimizer = distopt.create(self.server_optimizer, plist, **self.server_hparams)

    def server_step(self, average: Any) -> Any:
        """New global ArrayRecord from the averaged one (``self._current`` = weights sent)."""
        current, avg = to_numpy(self._current), to_numpy(average)
        if self.params is None:
            self._build(current)
        assert self.params is not None and self.optimizer is not None
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(current[k]))
                p.grad = p - torch.from_numpy(avg[k]).to(p.dtype)
        self.optimizer.step()
        out = {k: (self.params[k].detach().numpy().copy() if k in self.params else avg[k].astype(current[k].dtype))
               for k in current}
        return numpy_record(out)

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        average, metrics = super().aggregate_train(server_round, replies)
        if average is None:
            return None, metrics
        return self.server_step(average), metrics

def reddi_strategy(rule: str, *, eta: float | None = None, beta_1: float | None = None, beta_2: float = 0.99,
                   tau: float = 1e-3, initial_accumulator: float | None = None, **kwargs: Any) -> FedOpt:
    """FedAdam / FedYogi / FedAdagrad of Reddi et al. (2021) (defaults: Flower's η, β, τ;
    ``v_{-1} = τ²`` unless ``initial_accumulator`` is given)."""
    eta = {"adam": 0.1, "yogi": 1e-2, "adagrad": 0.1}[rule] if eta is None else eta
    beta_1 = (0.0 if rule == "adagrad" else 0.9) if beta_1 is None else beta_1
    initial = tau * tau if initial_accumulator is None else initial_accumulator
    for name, value, ok in (("eta", eta, eta >= 0), ("tau", tau, tau >= 0), ("beta_1", beta_1, 0 <= beta_1 < 1),
                            ("beta_2", beta_2, 0 <= beta_2 < 1), ("initial_accumulator", initial, initial >= 0)):
        if not (math.isfinite(value) and ok):
            raise ValueError(f"fed{rule}: invalid {name}={value!r}")
    recipe = reddi_recipe(rule, eta, beta_1, beta_2, tau, initial)
    strategy = FedOpt(server_optimizer=lambda params: ChainOptimizer(params, recipe, lr=eta), **kwargs)
    strategy.server_hparams = {"rule": rule, "eta": eta, "beta_1": beta_1, "beta_2": beta_2, "tau": tau,
                               "initial_accumulator": initial}
    return strategy


# ------------------------------------------------------------------ SCAFFOLD
class Scaffold(DistoptStrategy, flwr_strategy.FedAvg):
    """SCAFFOLD's server (Karimireddy et al. 2020, Alg. 1 lines 16-17): ``global_lr`` is η_g."""

    def __init__(self, param_names: Iterable[str], global_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not (math.isfinite(global_lr) and global_lr > 0):
            raise ValueError(f"scaffold: global_lr must be > 0, got {global_lr!r}")
        self.param_names, self.global_lr = list(param_names), float(global_lr)
        self.c: dict[str, np.ndarray] | None = None
        self.num_nodes = 0

    def configure_train(self, server_round: int, arrays: Any, config: Any, grid: Any) -> Iterable[Any]:
        if self.c is None:
            self.c = {k: np.zeros_like(arrays[k].numpy()) for k in self.param_names}
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.num_nodes = len(list(grid.get_node_ids()))
        record = numpy_record(self.c)
        for msg in messages:
            msg.content[SCAFFOLD_C] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        valid = self.prepare_replies(server_round, replies)
        if not valid:
            return None, None
        x = to_numpy(self._current)
        ys = [to_numpy(m.content["arrays"]) for m in valid]
        dcs = [to_numpy(m.content[SCAFFOLD_DC]) for m in valid]
        s = len(valid)
        new_x = {}
        for k, xk in x.items():
            if not np.issubdtype(xk.dtype, np.floating):
                new_x[k] = ys[0][k]
                continue
            dx = sum((y[k] - xk for y in ys[1:]), start=ys[0][k] - xk) / s
            new_x[k] = (xk + self.global_lr * dx).astype(xk.dtype)
        assert self.c is not None
        n = max(self.num_nodes, s)
        for k in self.c:
            dc = sum((d[k] for d in dcs[1:]), start=dcs[0][k]) / s
            self.c[k] = (self.c[k] + (s / n) * dc).astype(self.c[k].dtype)
        for m in valid:  # Flower's metric aggregation expects exactly the metrics record
            del m.content[SCAFFOLD_DC]
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return numpy_record(new_x), metrics


# ------------------------------------------------------------------ client-level DP
class ClientLevelDP(flwr_strategy.DifferentialPrivacyServerSideFixedClipping):
    """Flower's central-DP wrapper (server-side fixed clipping; McMahan et al., ICLR 2018) around a
    distopt strategy. Two additions: ZO replies are replayed into weights *before* Flower clips
    the updates (so zeroth-order clients get client-level DP too), and a round that Flower skips
    because a client failed still has its failures logged."""

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
        replies = list(replies)
        core = inner(self)
        if any(m.has_error() for m in replies):
            core.prepare_replies(server_round, replies)  # Flower aggregates nothing this round
        else:
            for msg in replies:
                if ZO_RECORD in msg.content.array_records:
                    core._replay_zo(server_round, msg)
        return super().aggregate_train(server_round, replies)


# ------------------------------------------------------------------ names -> strategies
def build_strategy(
    name: str = "fedavg", *, task: Any = None, server_optimizer: Any = None,
    server_hparams: Mapping[str, Any] | None = None,
    fraction_train: float = 1.0, fraction_evaluate: float = 0.0, min_available_nodes: int = 2, seed: int = 0,
    client_dp: Mapping[str, Any] | None = None, discover: bool | str = "auto",
) -> Any:
    """A strategy by name (see :data:`STRATEGIES`); ``server_optimizer`` implies ``fedopt``.

    ``client_dp={"noise_multiplier": σ, "clipping_norm": C}`` wraps it in Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (:class:`ClientLevelDP`; client-level DP:
    every client's update is clipped to norm C, Gaussian noise of std σC/m is added to the
    average of the m sampled clients; Flower skips a round in which a client failed).
    """
    name = name.lower()
    hp = dict(server_hparams or {})
    if server_optimizer is not None and name == "fedavg":
        name = "fedopt"
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    if server_optimizer is not None and name != "fedopt":
        raise ValueError(f"server_optimizer= is for strategy 'fedopt' (or 'fedavg'), not {name!r}")
    if name in ("fedavg", "fedmedian") and hp:
        raise TypeError(f"{name}: takes no server hyperparameters, got {sorted(hp)}")
    min_train = max(1, min(2, min_available_nodes))
    common = dict(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=min_train,
                  min_evaluate_nodes=min_train if fraction_evaluate > 0 else 0, min_available_nodes=min_available_nodes,
                  seed=seed, task=task, discover=discover)
    if name == "fedavg":
        strategy: Any = FedAvg(**common)
    elif name == "fedavgm":
        strategy = FedAvgM(**common, **hp)
    elif name == "fedprox":
        strategy = FedProx(**common, proximal_mu=float(hp.pop("proximal_mu", 0.01)), **hp)
    elif name in ("fedadam", "fedyogi", "fedadagrad"):
        strategy = reddi_strategy(name[3:], **hp, **common)
    elif name == "fedmedian":
        strategy = FedMedian(**common)
    elif name == "fedtrimmedavg":
        strategy = FedTrimmedAvg(**common, **hp)
    elif name == "krum":
        strategy = Krum(**common, **hp)
    elif name == "scaffold":
        if task is None:
            raise ValueError("scaffold needs task= (to know which arrays are parameters)")
        names = [k for k, _ in task.build_model().named_parameters()]
        strategy = Scaffold(names, global_lr=float(hp.pop("global_lr", 1.0)), **common)
        if hp:
            raise TypeError(f"scaffold: unknown server hyperparameters {sorted(hp)}; allowed: global_lr")
    else:
        strategy = FedOpt(server_optimizer=server_optimizer or "sgd", server_hparams=hp, **common)
    if client_dp:
        dp = dict(client_dp)
        sampled = max(int(min_available_nodes * fraction_train), min_train)
        strategy = ClientLevelDP(
            strategy, noise_multiplier=float(dp.get("noise_multiplier", 1.0)),
            clipping_norm=float(dp.get("clipping_norm", 1.0)), num_sampled_clients=sampled)
    return strategy


def inner(strategy: Any) -> Any:
    """The distopt strategy inside Flower's DP wrappers (or the strategy itself)."""
    while not isinstance(strategy, DistoptStrategy) and hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


__all__ = [
    "STRATEGIES", "ClientLevelDP", "DistoptStrategy", "FedAvg", "FedAvgM", "FedMedian", "FedOpt", "FedProx",
    "FedTrimmedAvg", "Krum", "Scaffold", "build_strategy", "inner", "reddi_recipe", "reddi_strategy",
]
