"""Client-side pieces, run in-process on Flower Messages and Contexts (no simulation):
FedProx's proximal operator (gradient check), SCAFFOLD's client (option II), ε carried across
rounds in Context.state, ZO uploads (size, and the server's replay = the client's model), and
flwr-datasets partitioning."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from fedtasks import TinyTask, context, instruction  # noqa: E402
from flwr.app import ConfigRecord, RecordDict  # noqa: E402

import distopt  # noqa: E402
from distopt.integrations.flower.client import (  # noqa: E402
    SCAFFOLD_C, SCAFFOLD_DC, SCAFFOLD_STATE, ClientSpec, client_train, federated_optimizer, message_bytes,
    model_to_arrays, numpy_record,
)
from distopt.integrations.flower.dp import SampleDP  # noqa: E402
from distopt.integrations.flower.zo import ZOConfig, replay_into  # noqa: E402
from distopt.scenarios.fedprox import ProximalTerm  # noqa: E402
from distopt.scenarios.scaffold import ScaffoldCorrection  # noqa: E402


def _train_message(model, rnd=1, **extra):
    content = {"arrays": model_to_arrays(model), "config": ConfigRecord({"server-round": rnd, **extra.pop("cfg", {})})}
    content.update(extra)
    return instruction(RecordDict(content), node_id=5)


def _weights(reply):
    return {k: torch.from_numpy(a.numpy()) for k, a in reply.content["arrays"].items()}


# ---------------------------------------------------------------- FedProx
@pytest.mark.parametrize("foreach", [True, False])
def test_proximal_term_is_the_gradient_of_mu_half_squared_distance(foreach):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    anchor = {p: p.detach().clone() + 0.3 * torch.randn_like(p) for p in model.parameters()}
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 2, (7,))
    mu, lr = 0.37, 0.1
    # reference: autograd of loss + μ/2 ||w - w^t||²
    ref = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    out = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, ref[0], ref[1])), ref[2], ref[3])
    prox = sum(((r - anchor[p]) ** 2).sum() for r, p in zip(ref, model.parameters()))
    (torch.nn.functional.cross_entropy(out, y) + mu / 2 * prox).backward()
    want = [r.detach() - lr * r.grad for r in ref]
    # operator route: plain loss gradient, ProximalTerm in front of SGD's recipe
    opt = federated_optimizer("sgd", model.parameters(), [ProximalTerm(mu, anchor)], lr=lr, foreach=foreach)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_proximal_gradient_finite_differences():
    torch.manual_seed(1)
    w = torch.randn(3, 4, dtype=torch.float64)
    a = torch.randn(3, 4, dtype=torch.float64)
    p = torch.nn.Parameter(w.clone())
    p.grad = torch.zeros_like(p)
    opt = federated_optimizer("sgd", [p], [ProximalTerm(0.8, {p: a})], lr=1.0)
    opt.step()
    grad_op = w - p.detach()  # the step taken = the operator's gradient
    f = lambda v: 0.4 * ((v - a) ** 2).sum()  # noqa: E731  μ/2 ||v - a||², μ = 0.8
    fd = torch.zeros_like(w)
    for i in range(w.numel()):
        e = torch.zeros(w.numel(), dtype=torch.float64)
        e[i] = 1e-6
        e = e.view_as(w)
        fd.view(-1)[i] = (f(w + e) - f(w - e)) / 2e-6
    torch.testing.assert_close(grad_op, fd, rtol=1e-7, atol=1e-8)


def test_client_applies_proximal_mu_from_config():
    task = TinyTask()
    spec = ClientSpec(task, "sgd", 4, {"lr": 0.5})
    base = client_train(_train_message(task.build_model()), context(0, 2), spec)
    prox = client_train(_train_message(task.build_model(), cfg={"proximal-mu": 1.0}), context(0, 2), spec)
    x0 = {k: v.detach() for k, v in task.build_model().state_dict().items()}
    dist = lambda r: sum(((_weights(r)[k] - x0[k]) ** 2).sum() for k in x0)  # noqa: E731
    assert dist(prox) < 0.8 * dist(base)  # pulled towards w^t


def test_operators_go_after_the_e_stage():
    from distopt.core.operator import Stage

    p = torch.nn.Parameter(torch.zeros(3))
    opt = federated_optimizer("mars", [p], [ScaffoldCorrection({})])
    ops = list(type(opt).recipe(opt.param_groups[0]))
    stages = [op.stage for op in ops]
    assert stages == sorted(stages) and isinstance(ops[stages.index(Stage.T)], ScaffoldCorrection)


# ---------------------------------------------------------------- SCAFFOLD (option II)
def test_scaffold_client_option_ii():
    task = TinyTask(rows=24, batch_size=24)  # full batch: the manual loop sees the same gradients
    model = task.build_model()
    names = [k for k, _ in model.named_parameters()]
    rng = torch.Generator().manual_seed(3)
    c = {k: 0.05 * torch.randn(p.shape, generator=rng) for k, p in model.named_parameters()}
    ci = {k: 0.05 * torch.randn(p.shape, generator=rng) for k, p in model.named_parameters()}
    ctx = context(1, 2)
    ctx.state[SCAFFOLD_STATE] = numpy_record({k: v.numpy() for k, v in ci.items()})
    K, lr = 5, 0.3
    reply = client_train(_train_message(model, **{SCAFFOLD_C: numpy_record({k: v.numpy() for k, v in c.items()})}),
                         ctx, ClientSpec(task, "sgd", K, {"lr": lr}))
    # manual SCAFFOLD: y <- y - η (∇f(y) - c_i + c), K times; c_i+ = c_i - c + (x - y)/(K η)
    ref = task.build_model()
    x = {k: p.detach().clone() for k, p in ref.named_parameters()}
    data = task.load_partition(1, 2)
    for _ in range(K):
        ref.zero_grad()
        torch.nn.functional.cross_entropy(ref(data.tensors[0]), data.tensors[1]).backward()
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p -= lr * (p.grad - ci[k] + c[k])
    y = dict(ref.named_parameters())
    got_y = _weights(reply)
    for k in names:
        torch.testing.assert_close(got_y[k], y[k].detach(), rtol=1e-5, atol=1e-6)
    ci_new = {k: torch.from_numpy(a.numpy()) for k, a in ctx.state[SCAFFOLD_STATE].items()}
    dc = {k: torch.from_numpy(a.numpy()) for k, a in reply.content[SCAFFOLD_DC].items()}
    for k in names:
        want = ci[k] - c[k] + (x[k] - got_y[k]) / (K * lr)
        torch.testing.assert_close(ci_new[k], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dc[k], want - ci[k], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sample-level DP: ε across rounds
def test_epsilon_accumulates_across_rounds_in_context_state():
    from opacus.accountants import RDPAccountant

    task = TinyTask(rows=24, batch_size=8)
    dp = SampleDP(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    spec = ClientSpec(task, "adamw", 3, {"lr": 1e-2}, dp=dp)
    ctx = context(0, 2)  # one client's Context, kept across its rounds (as the SuperNode keeps it)
    q = 8 / 24  # Opacus: sample_rate = 1 / len(loader)
    eps = []
    for rnd in (1, 2, 3):
        reply = client_train(_train_message(task.build_model(), rnd=rnd), ctx, spec)
        eps.append(float(reply.content["metrics"]["epsilon"]))
        acc = RDPAccountant()
        acc.history = [(1.1, q, rnd * 3)]
        assert eps[-1] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert eps[0] < eps[1] < eps[2]
    one_round = RDPAccountant()
    one_round.history = [(1.1, q, 3)]
    assert eps[2] > 1.3 * one_round.get_epsilon(1e-5)  # not reset each round


# ---------------------------------------------------------------- ZO
@pytest.mark.parametrize("recipe,steps", [("zo_sgd", 10), ("zo_adam", 10), ("hizoo", 6)])
def test_zo_upload_is_small_and_replays_to_the_client_model(monkeypatch, recipe, steps):
    task = TinyTask()
    model = task.build_model()
    captured = {}
    original = TinyTask.train

    def train_and_capture(self, m, opt, data, k):
        out = original(self, m, opt, data, k)
        captured["local"] = {name: v.detach().clone() for name, v in m.state_dict().items()}
        return out

    monkeypatch.setattr(TinyTask, "train", train_and_capture)
    spec = ClientSpec(task, "adamw", steps, {}, zo=ZOConfig(optimizer=recipe, lr=0.05, eps=1e-3))
    reply = client_train(_train_message(model), context(0, 2), spec)
    assert "arrays" not in reply.content.array_records  # the model never goes up
    if recipe == "zo_sgd":  # the default configuration: 10 local steps of MeZO
        assert message_bytes(reply) <= 1024, message_bytes(reply)
    arrays = {k: a.numpy() for k, a in reply.content["zo"].items()}
    assert arrays["scalars"].shape[0] == steps
    replayed = task.build_model()
    replay_into(list(replayed.parameters()), arrays, dict(reply.content["zo-header"]))
    moved = 0.0
    for k, v in replayed.state_dict().items():
        assert torch.equal(v, captured["local"][k]), k  # bit for bit: the server has the client's model
        moved += float((v - model.state_dict()[k]).abs().max())
    assert moved > 0


# ---------------------------------------------------------------- partitioning
def test_partitions_are_seeded_and_cover_the_data():
    from distopt.integrations.flower.partition import parse_scheme, partition_arrays

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((600, 3)).astype(np.float32), np.repeat(np.arange(10), 60)
    iid = partition_arrays(x, y, "iid", 6, seed=1)
    assert sum(iid.sizes()) == 600 and max(iid.sizes()) - min(iid.sizes()) <= 1
    d1 = partition_arrays(x, y, "dirichlet:0.1", 6, seed=1)
    d2 = partition_arrays(x.copy(), y.copy(), "dirichlet:0.1", 6, seed=1)
    assert sum(d1.sizes()) == 600
    for pid in range(6):
        np.testing.assert_array_equal(d1.load(pid)[1], d2.load(pid)[1])
    # Dirichlet(0.1) is label-skewed: the most common label of a client dominates far more than under IID
    top = lambda p: np.mean([np.bincount(p.load(i)[1], minlength=10).max() / max(1, len(p.load(i)[1]))  # noqa: E731
                             for i in range(6)])
    assert top(d1) > 2 * top(iid)
    path = partition_arrays(x, y, "pathological:2", 6, seed=1)
    assert all(len(np.unique(path.load(i)[1])) <= 2 for i in range(6))
    assert parse_scheme("dirichlet:0.5") == ("dirichlet", 0.5)
    for bad in ("dirichlet", "dirichlet:-1", "foo", "pathological:0"):
        with pytest.raises(ValueError, match="partition scheme"):
            parse_scheme(bad)


def test_bad_client_settings_raise():
    with pytest.raises(ValueError, match="local_steps"):
        ClientSpec(TinyTask(), "adamw", 0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        ClientSpec(TinyTask(), "adamz", 1)
    with pytest.raises(ValueError, match="zo: eps"):
        ZOConfig(eps=0.0)
    with pytest.raises(ValueError, match="not a zeroth-order recipe"):
        ZOConfig(optimizer="adamw")
    with pytest.raises(ValueError, match="DP-ZO"):
        ClientSpec(TinyTask(), "adamw", 1, dp=SampleDP(), zo=ZOConfig())
    assert math.isfinite(distopt.get("lion").hyperparameters()["lr"].default)


def test_zo_replies_are_replayed_before_client_level_dp_clipping():
    """Server side of ZO + client-level DP: replies are replayed first, then Flower clips the
    replayed updates (σ = 0, huge C: exactly FedAvg of the replayed client models)."""
    from distopt.integrations.flower.strategies import build_strategy

    task = TinyTask()
    spec = ClientSpec(task, "adamw", 4, {}, zo=ZOConfig(lr=0.05))
    arrays = model_to_arrays(task.build_model())

    def replies():  # one node per partition, arriving out of order
        return [client_train(instruction(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                                         node_id=50 + pid), context(pid, 3), spec) for pid in (2, 0, 1)]

    plain = build_strategy("fedavg", task=task, min_available_nodes=3)
    private = build_strategy("fedavg", task=task, min_available_nodes=3,
                             client_dp={"noise_multiplier": 0.0, "clipping_norm": 1e6})
    for s in (plain, private.strategy):
        s._current = arrays
    private.current_arrays = arrays
    want, _ = plain.aggregate_train(1, replies())
    got, _ = private.aggregate_train(1, replies())
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=1e-6, atol=1e-7)
    assert private.strategy.rounds[1]["partitions"] == [0, 1, 2]


def test_clients_without_data_reply_and_aggregate():
    """Dirichlet splits over many clients leave some empty: they reply (num-examples 0, no task
    metrics, a ZO log of 0 steps) and the server aggregates the others."""
    from distopt.integrations.flower.strategies import build_strategy

    class Sparse(TinyTask):
        def load_partition(self, partition_id, num_partitions):
            data = super().load_partition(partition_id, num_partitions)
            return torch.utils.data.Subset(data, []) if partition_id == 1 else data

    task = Sparse()
    arrays = model_to_arrays(task.build_model())
    for spec in (ClientSpec(task, "sgd", 3, {"lr": 0.1}), ClientSpec(task, "adamw", 3, {}, zo=ZOConfig())):
        replies = [client_train(instruction(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                                            node_id=70 + pid), context(pid, 3), spec) for pid in range(3)]
        assert replies[1].content["metrics"]["num-examples"] == 0
        strategy = build_strategy("fedavg", task=task, min_available_nodes=3)
        strategy._current = arrays
        new, metrics = strategy.aggregate_train(1, replies)
        assert new is not None and "train-loss" in metrics
