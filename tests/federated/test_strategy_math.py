"""Server-side math, on the strategies' aggregate functions directly (no simulation):
FedAdam / FedYogi / FedAdagrad against Reddi et al. (ICLR 2021, Algorithm 2), the generalized
FedOpt against torch.optim on the pseudo-gradient, and SCAFFOLD's server update (Alg. 1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fedtasks import instruction  # noqa: E402
from flwr.app import ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAdagrad as FlowerFedAdagrad  # noqa: E402
from flwr.serverapp.strategy import FedYogi as FlowerFedYogi  # noqa: E402

from distopt.integrations.flower.client import SCAFFOLD_DC, numpy_record  # noqa: E402
from distopt.integrations.flower.strategies import Scaffold, build_strategy  # noqa: E402

SHAPES = {"w": (4, 3), "b": (3,)}
ROUNDS = 4


def _arrays(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s) * scale for k, s in SHAPES.items()}


def _replies(clients: list[dict[str, np.ndarray]], sizes: list[int], extra=None) -> list:
    out = []
    for i, (arrs, n) in enumerate(zip(clients, sizes)):
        content = {"arrays": numpy_record(arrs), "metrics": MetricRecord({"num-examples": n}),
                   "distopt": ConfigRecord({"partition-id": i})}
        if extra is not None:
            content[SCAFFOLD_DC] = numpy_record(extra[i])
        sent = instruction(RecordDict({}), node_id=1000 + 7 * i)
        from flwr.app import Message

        out.append(Message(RecordDict(content), reply_to=sent))
    return out[::-1]  # arrival order differs from partition order


def _weighted_mean(clients, sizes):
    total = float(sum(sizes))
    return {k: sum(c[k] * (n / total) for c, n in zip(clients, sizes)) for k in SHAPES}


def _run_strategy(strategy, x0, rounds_data):
    """Feed the aggregate function ROUNDS rounds; returns the sequence of global weights."""
    x, xs = x0, []
    for r, (clients, sizes) in enumerate(rounds_data, start=1):
        strategy._current = numpy_record(x)
        new, _ = strategy.aggregate_train(r, _replies(clients, sizes))
        x = {k: a.numpy() for k, a in new.items()}
        xs.append(x)
    return xs


def _reddi_reference(rule, x0, rounds_data, eta, beta_1, beta_2, tau, v0):
    x = {k: v.copy() for k, v in x0.items()}
    m = {k: np.zeros_like(v) for k, v in x0.items()}
    v = {k: np.full_like(val, v0) for k, val in x0.items()}
    xs = []
    for clients, sizes in rounds_data:
        avg = _weighted_mean(clients, sizes)
        for k in x:
            delta = avg[k] - x[k]  # Δ_t = mean_i Δ_t^i
            m[k] = beta_1 * m[k] + (1 - beta_1) * delta
            if rule == "adam":
                v[k] = beta_2 * v[k] + (1 - beta_2) * delta**2
            elif rule == "yogi":
                v[k] = v[k] - (1 - beta_2) * delta**2 * np.sign(v[k] - delta**2)
            else:
                v[k] = v[k] + delta**2
            x[k] = x[k] + eta * m[k] / (np.sqrt(v[k]) + tau)
        xs.append({k: val.copy() for k, val in x.items()})
    return xs


def _rounds_data(seed=0, clients=3):
    rng = np.random.default_rng(seed)
    x0 = _arrays(rng)
    data, x = [], x0
    for _ in range(ROUNDS):
        data.append(([{k: x[k] + v for k, v in _arrays(rng, 0.1).items()} for _ in range(clients)],
                     [int(n) for n in rng.integers(5, 50, clients)]))
    return x0, data


def _max_rel(a, b):
    return max(float(np.max(np.abs(a[k] - b[k])) / (np.max(np.abs(b[k])) + 1e-30)) for k in b)


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_reddi_strategies_match_paper_formulas(rule):
    x0, data = _rounds_data()
    hp = dict(eta=0.05, beta_1=0.0 if rule == "adagrad" else 0.9, beta_2=0.99, tau=1e-3)
    strategy = build_strategy(f"fed{rule}", server_hparams=hp, min_available_nodes=3)
    got = _run_strategy(strategy, x0, data)
    want = _reddi_reference(rule, x0, data, v0=hp["tau"] ** 2, **hp)  # paper: v_{-1} >= τ²; default τ²
    dev = max(_max_rel(g, w) for g, w in zip(got, want))
    assert dev < 1e-7, dev
    assert _max_rel(got[-1], x0) > 1e-3  # it moved


@pytest.mark.parametrize("rule,flower", [("yogi", FlowerFedYogi), ("adagrad", FlowerFedAdagrad)])
def test_reddi_strategies_with_zero_init_match_flower(rule, flower):
    """Flower's FedYogi / FedAdagrad start from v_{-1} = 0; with that init ours is the same.
    (Flower's FedAdam is not compared: it multiplies η by sqrt(1-β2^{t+1})/(1-β1^{t+1}), a
    bias correction that Algorithm 2 of the paper does not have.)"""
    x0, data = _rounds_data(seed=1)
    hp = dict(eta=0.03, beta_1=0.9 if rule == "yogi" else 0.0, beta_2=0.99, tau=1e-3)
    ours = build_strategy(f"fed{rule}", server_hparams={**hp, "initial_accumulator": 0.0}, min_available_nodes=3)
    got = _run_strategy(ours, x0, data)
    theirs = flower(eta=hp["eta"], beta_1=hp["beta_1"], beta_2=hp["beta_2"], tau=hp["tau"]) if rule == "yogi" else \
        flower(eta=hp["eta"], tau=hp["tau"])  # Flower's FedAdagrad fixes β1 = 0
    x, want = x0, []
    for r, (clients, sizes) in enumerate(data, start=1):
        theirs.current_arrays = {k: v.copy() for k, v in x.items()}
        replies = sorted(_replies(clients, sizes), key=lambda m: m.content["distopt"]["partition-id"])
        new, _ = theirs.aggregate_train(r, replies)
        x = {k: a.numpy() for k, a in new.items()}
        want.append(x)
    assert max(_max_rel(g, w) for g, w in zip(got, want)) < 1e-7


@pytest.mark.parametrize("name,hparams", [("adam", {"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6}),
                                           ("sgd", {"lr": 0.5, "momentum": 0.9}),
                                           ("adagrad", {"lr": 0.1})])
def test_fedopt_any_recipe_steps_on_the_pseudo_gradient(name, hparams):
    """fedopt + server_optimizer=<name> == torch.optim.<Name> on g = x_t - mean_i(x_i)."""
    x0, data = _rounds_data(seed=2)
    got = _run_strategy(build_strategy("fedopt", server_optimizer=name, server_hparams=hparams,
                                       min_available_nodes=3), x0, data)
    params = {k: torch.tensor(v) for k, v in x0.items()}
    ref = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad}[name](
        list(params.values()), **hparams)
    for (clients, sizes), g in zip(data, got):
        avg = _weighted_mean(clients, sizes)
        for k, p in params.items():
            p.grad = p.detach() - torch.from_numpy(avg[k])
        ref.step()
        assert _max_rel(g, {k: p.detach().numpy() for k, p in params.items()}) < 1e-10


def test_fedopt_sgd_lr1_is_fedavg():
    x0, data = _rounds_data(seed=3)
    got = _run_strategy(build_strategy("fedopt", server_optimizer="sgd", server_hparams={"lr": 1.0},
                                       min_available_nodes=3), x0, data[:1])
    assert _max_rel(got[0], _weighted_mean(*data[0])) < 1e-12


def test_scaffold_server_update_matches_algorithm_1():
    rng = np.random.default_rng(4)
    x0 = _arrays(rng)
    strategy = Scaffold(["w", "b"], global_lr=0.7, min_available_nodes=5)
    strategy.c = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
    c_before = {k: v.copy() for k, v in strategy.c.items()}
    strategy.num_nodes = 5  # N clients in total, |S| = 3 sampled
    ys = [_arrays(rng) for _ in range(3)]
    dcs = [_arrays(rng, 0.1) for _ in range(3)]
    strategy._current = numpy_record(x0)
    new, _ = strategy.aggregate_train(1, _replies(ys, [3, 9, 27], extra=dcs))
    got = {k: a.numpy() for k, a in new.items()}
    for k in SHAPES:  # uniform means (the paper's 1/|S| Σ), not num-examples weights
        want_x = x0[k] + 0.7 * sum(y[k] - x0[k] for y in ys) / 3
        want_c = c_before[k] + (3 / 5) * sum(d[k] for d in dcs) / 3
        np.testing.assert_allclose(got[k], want_x, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(strategy.c[k], want_c, rtol=1e-12, atol=1e-12)


def test_failed_replies_are_logged_and_skipped():
    from flwr.app import Error, Message

    x0, data = _rounds_data(seed=5)
    strategy = build_strategy("fedavg", min_available_nodes=3)
    strategy._current = numpy_record(x0)
    replies = _replies(*data[0])
    bad = Message(Error(code=0, reason="boom"), reply_to=instruction(RecordDict({}), node_id=4242))
    new, _ = strategy.aggregate_train(1, replies + [bad])
    got = {k: a.numpy() for k, a in new.items()}
    assert _max_rel(got, _weighted_mean(*data[0])) < 1e-12
    log = strategy.rounds[1]
    assert log["received"] == 3 and log["failures"][0]["reason"] == "boom" and log["failures"][0]["node_id"] == 4242
    assert log["partitions"] == [0, 1, 2]  # sorted, whatever the arrival order


def test_unknown_strategy_and_bad_hparams_raise():
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy("fedfoo")
    with pytest.raises(ValueError, match="server_optimizer"):
        build_strategy("krum", server_optimizer="adam")
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_strategy("fedopt", server_optimizer="nope")
    with pytest.raises(ValueError, match="tau"):
        build_strategy("fedadam", server_hparams={"tau": -1.0})


def test_client_level_dp_wrapper_clips_and_noises():
    """Flower's DifferentialPrivacyServerSideFixedClipping around our FedAvg: every update is
    clipped to norm C; σ = 0 gives exactly the mean of the clipped updates, σ > 0 adds noise
    of std σC/m."""
    rng = np.random.default_rng(6)
    x0 = _arrays(rng)
    ys = [{k: x0[k] + rng.standard_normal(s) * sc for k, s in SHAPES.items()} for sc in (0.01, 3.0, 5.0)]

    def run(sigma):
        strategy = build_strategy("fedavg", min_available_nodes=3, client_dp={"noise_multiplier": sigma,
                                                                               "clipping_norm": 1.0})
        strategy.current_arrays = numpy_record(x0)
        strategy.strategy._current = numpy_record(x0)
        new, _ = strategy.aggregate_train(1, _replies(ys, [1, 1, 1]))
        return {k: a.numpy() for k, a in new.items()}

    def clipped(y):
        d = {k: y[k] - x0[k] for k in SHAPES}
        norm = np.sqrt(sum((v**2).sum() for v in d.values()))
        return {k: v * min(1.0, 1.0 / norm) for k, v in d.items()}

    want = {k: x0[k] + sum(clipped(y)[k] for y in ys) / 3 for k in SHAPES}
    assert _max_rel(run(0.0), want) < 1e-10
    np.random.seed(0)
    noisy = run(50.0)
    resid = np.concatenate([(noisy[k] - want[k]).ravel() for k in SHAPES])
    assert 0.5 * 50 / 3 < resid.std() < 1.5 * 50 / 3


def _server_recipes() -> list[str]:
    import distopt

    return [n for n in distopt.available() if distopt.get(n).family != "zeroth_order"
            and getattr(distopt.get(n), "closure_kind", "backward") == "backward"]


@pytest.mark.parametrize("name", _server_recipes())
def test_every_gradient_recipe_can_be_the_server_optimizer(name):
    """FedOpt generalized: FedMuon, FedShampoo, FedLion, ... all run on the pseudo-gradient."""
    x0, data = _rounds_data(seed=8)
    got = _run_strategy(build_strategy("fedopt", server_optimizer=name, min_available_nodes=3), x0, data[:2])
    assert all(np.isfinite(v).all() for g in got for v in g.values())
    assert _max_rel(got[-1], x0) > 0


def test_unknown_server_hyperparameters_raise():
    with pytest.raises(TypeError):
        build_strategy("fedavg", server_hparams={"lr": 0.1})
    with pytest.raises(TypeError):
        build_strategy("fedadam", server_hparams={"etaa": 0.1})
    with pytest.raises(TypeError):
        build_strategy("fedopt", server_optimizer="adam", server_hparams={"momentum": 0.9})


@pytest.mark.parametrize("name", ["fedavgm", "fedprox", "fedmedian", "fedtrimmedavg", "krum"])
def test_flower_strategies_work_behind_the_mixin(name):
    """Flower's own strategies, made reproducible by the mixin, aggregate as Flower defines them."""
    x0, data = _rounds_data(seed=9, clients=5)
    clients, sizes = data[0]
    hp = {"fedavgm": {"server_momentum": 0.0, "server_learning_rate": 1.0}, "fedtrimmedavg": {"beta": 0.2},
          "krum": {"num_malicious_nodes": 1}}.get(name, {})
    strategy = build_strategy(name, server_hparams=hp, min_available_nodes=5)
    strategy._current = numpy_record(x0)
    if name == "fedavgm":  # Flower's FedAvgM keeps the weights it sent in configure_train
        strategy.current_arrays = numpy_record(x0)
    new, _ = strategy.aggregate_train(1, _replies(clients, sizes))
    got = {k: a.numpy() for k, a in new.items()}
    if name in ("fedavgm", "fedprox"):  # momentum 0, lr 1 / proximal term client-side: the weighted mean
        assert _max_rel(got, _weighted_mean(clients, sizes)) < 1e-10
    elif name == "fedmedian":
        assert _max_rel(got, {k: np.median([c[k] for c in clients], axis=0) for k in SHAPES}) < 1e-12
    elif name == "krum":
        assert any(_max_rel(got, c) < 1e-12 for c in clients)
    else:
        srt = {k: np.sort(np.stack([c[k] for c in clients]), axis=0)[1:-1].mean(axis=0) for k in SHAPES}
        assert _max_rel(got, srt) < 1e-10
