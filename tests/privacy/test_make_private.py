"""distopt.privacy.make_private with real Opacus: clipping (hooks and ghost) against per-example
backward passes, noise calibration, ε against Opacus' accountants, post-processing for several
recipes, virtual steps with BatchMemoryManager, the whole catalogue, and the refusals."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import distopt
from distopt.core.shell import DistOptimizer
from distopt.privacy import NotPrivatizable, make_private
from privacy_helpers import clipped_sum, data, loader, mlp, per_example_grads, train_step

pytest.importorskip("opacus")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.utils.batch_memory_manager import BatchMemoryManager  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:Optimal order is the largest alpha")

C = 2.0  # the per-example gradient norms of privacy_helpers.data() spread over [1.0, 3.7]


def _private(mode: str = "hooks"):
    """sgd with lr = 0 (parameters stay put), σ = 0, no Poisson sampling: p.grad is the clipped mean."""
    model = mlp()
    x, y = data()
    out = make_private(model, distopt.create("sgd", model.parameters(), lr=0.0), loader(x, y, 12), noise_multiplier=0.0,
                       max_grad_norm=C, grad_sample_mode=mode, poisson_sampling=False)
    return out[0], out[1], (out[2] if mode == "ghost" else None), (x, y)


# ---------------------------------------------------------------------------------- (a) clipping
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_clipped_sum_equals_per_example_backward(mode: str) -> None:
    reference_model = mlp()
    x, y = data()
    grads = per_example_grads(reference_model, x, y)
    exact, norms = clipped_sum(grads, C)
    opacus_form, _ = clipped_sum(grads, C, stabilizer=1e-6)  # Opacus clips with C / (‖g‖ + 1e-6)
    assert (norms > C).sum() >= 3 and (norms < C).sum() >= 3, "the data must exercise clipping both ways"

    module, dp_opt, criterion, _ = _private(mode=mode)
    train_step(module, dp_opt, x, y, criterion)  # sgd lr=0: parameters stay, p.grad is the private gradient
    b = dp_opt.expected_batch_size
    assert b == len(x)
    for p, e, o in zip(dp_opt.params, exact, opacus_form):
        torch.testing.assert_close(p.grad * b, e, rtol=1e-5, atol=1e-9)  # the 1e-6 stabilizer, nothing else
        torch.testing.assert_close(p.grad * b, o, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_each_per_sample_contribution_is_within_the_bound(mode: str) -> None:
    module, dp_opt, criterion, (x, y) = _private(mode=mode)
    norms = []
    for i in range(len(x)):  # the private pipeline on a batch holding one example: its clipped contribution
        train_step(module, dp_opt, x[i:i + 1], y[i:i + 1], criterion)
        norms.append(math.sqrt(sum(float((p.grad * dp_opt.expected_batch_size).pow(2).sum()) for p in dp_opt.params)))
    assert max(norms) <= C * (1 + 1e-9)
    assert sum(abs(n - C) < 1e-5 for n in norms) >= 3  # the large ones are clipped exactly to C


# ---------------------------------------------------------------------------------- (b) noise
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_std_is_sigma_times_c(mode: str) -> None:
    sigma, trials = 1.3, 20
    model = nn.Sequential(nn.Linear(20, 30)).double()
    torch.manual_seed(0)
    x, y = torch.randn(8, 20, dtype=torch.float64), torch.randint(0, 30, (8,))

    def grads(sig: float, gen: torch.Generator | None) -> list[torch.Tensor]:
        m = copy.deepcopy(model)
        opt = distopt.create("sgd", m.parameters(), lr=0.0)
        out = make_private(m, opt, loader(x, y, 8), noise_multiplier=sig, max_grad_norm=0.7, grad_sample_mode=mode,
                           poisson_sampling=False, noise_generator=gen, loss_reduction="sum",
                           **({"criterion": nn.CrossEntropyLoss(reduction="sum")} if mode == "ghost" else {}))
        module, dp_opt, crit = out[0], out[1], (out[2] if mode == "ghost" else None)
        rows = []
        for _ in range(trials if sig else 1):
            dp_opt.zero_grad()
            o = module(x)
            (crit(o, y) if crit else nn.functional.cross_entropy(o, y, reduction="sum")).backward()
            dp_opt.step()
            rows.append(torch.cat([p.grad.flatten() for p in dp_opt.params]))
        return rows

    clean = grads(0.0, None)[0]
    noise = torch.stack([g - clean for g in grads(sigma, torch.Generator().manual_seed(0))])
    assert noise.numel() >= 12000
    std = float(noise.std())
    assert abs(std / (sigma * 0.7) - 1) < 0.03, std
    assert abs(float(noise.mean())) < 4 * sigma * 0.7 / math.sqrt(noise.numel())


def test_noise_in_mean_mode_is_sigma_c_over_expected_batch() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 50)).double()
    x, y = torch.randn(16, 40, dtype=torch.float64), torch.randint(0, 50, (16,))
    rows = []
    for sig in (0.0, 2.0):
        m = copy.deepcopy(model)
        opt = distopt.create("sgd", m.parameters(), lr=0.0)
        module, dp_opt, _ = make_private(m, opt, loader(x, y, 16), noise_multiplier=sig, max_grad_norm=1.0,
                                         poisson_sampling=False, noise_generator=torch.Generator().manual_seed(3))
        train_step(module, dp_opt, x, y)
        rows.append(torch.cat([p.grad.flatten() for p in dp_opt.params]))
        if sig:
            assert dp_opt.noise_variance() == pytest.approx((2.0 * 1.0 / 16) ** 2)
    std = float((rows[1] - rows[0]).std())
    assert abs(std / (2.0 / 16) - 1) < 0.03


# ---------------------------------------------------------------------------------- (c) accounting
GRID = [  # (batch of 32 -> q, σ, T, δ)
    (4, 0.7, 3, 1e-5), (4, 2.0, 12, 1e-3), (16, 0.7, 12, 1e-3), (16, 2.0, 3, 1e-5), (8, 1.1, 7, 1e-6),
]


@pytest.mark.parametrize("mechanism,rel", [("rdp", 1e-6), ("prv", 1e-3)])
@pytest.mark.parametrize("batch,sigma,steps,delta", GRID)
def test_epsilon_equals_opacus_accountant(mechanism: str, rel: float, batch: int, sigma: float, steps: int,
                                          delta: float) -> None:
    model = mlp(hidden=4)
    x, y = data(32)
    opt = distopt.create("adamw", model.parameters(), lr=1e-3)
    module, dp_opt, dl = make_private(model, opt, loader(x, y, batch), noise_multiplier=sigma, max_grad_norm=C,
                                      accountant=mechanism, poisson_sampling=False, target_delta=delta)
    for (xb, yb), _ in zip(itertools.cycle(dl), range(steps)):
        train_step(module, dp_opt, xb, yb)
    reference = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=batch / 32)
    eps, d = dp_opt.privacy_spent()
    assert d == delta
    assert eps == pytest.approx(reference.get_epsilon(delta), rel=rel)
    assert dp_opt.privacy_spent(delta * 10)[0] < eps  # a larger δ buys a smaller ε
    assert dp_opt.privacy.steps == steps


def test_target_epsilon_calibrates_sigma_with_opacus() -> None:
    model = mlp()
    x, y = data(32)
    opt = distopt.create("adamw", model.parameters(), lr=1e-3)
    _, dp_opt, dl = make_private(model, opt, loader(x, y, 8), target_epsilon=3.0, target_delta=1e-5, epochs=5,
                                 max_grad_norm=C, accountant="rdp")
    expected = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=8 / 32, epochs=5, accountant="rdp")
    assert dp_opt.noise_multiplier == expected


# ---------------------------------------------------------------------------------- (d) post-processing
POST = {
    "adamw": {"lr": 1e-2, "weight_decay": 0.1},
    "lion": {"lr": 1e-3},
    "muon": {"lr": 2e-2, "ns_dtype": None},
    "adafactor": {"lr": 1e-2},
    "lamb": {"lr": 1e-2},
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "schedule_free_adamw": {"lr": 1e-2},
    "lookahead": {"lr": 1e-2, "k": 2},
}


@pytest.mark.parametrize("name", sorted(POST))
def test_wrapped_step_equals_unwrapped_step_on_the_private_gradient(name: str) -> None:
    model, twin = mlp(), mlp()
    x, y = data(24)
    opt = distopt.create(name, model.parameters(), **POST[name])
    plain = distopt.create(name, twin.parameters(), **POST[name])
    module, dp_opt, dl = make_private(model, opt, loader(x, y, 6), noise_multiplier=0.8, max_grad_norm=C,
                                      noise_generator=torch.Generator().manual_seed(0))
    steps = 0
    for _ in range(2):
        for xb, yb in dl:  # Poisson batches, noise on
            train_step(module, dp_opt, xb, yb)
            for p, q in zip(model.parameters(), twin.parameters()):
                q.grad = p.grad.clone()  # the private gradient, handed to the unwrapped optimizer
            plain.step()
            steps += 1
            for p, q in zip(model.parameters(), twin.parameters()):
                assert torch.equal(p, q), f"{name}: step {steps} differs"
    assert steps >= 6 and not torch.equal(next(model.parameters()), next(mlp().parameters()))
    assert dp_opt.state is opt.state and dp_opt.param_groups is opt.param_groups


def test_attributes_forward_to_the_wrapped_optimizer() -> None:
    model = mlp()
    x, y = data()
    opt = distopt.create("schedule_free_adamw", model.parameters(), lr=1e-2)
    module, dp_opt, _ = make_private(model, opt, loader(x, y, 6), noise_multiplier=1.0, max_grad_norm=C)
    train_step(module, dp_opt, x[:6], y[:6])
    dp_opt.eval()  # schedule-free: parameters <- x
    assert opt.param_groups[0]["train_mode"] is False
    dp_opt.train()
    with pytest.raises(AttributeError):
        dp_opt.no_such_attribute  # noqa: B018


# ---------------------------------------------------------------------------------- (f) virtual steps
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_batch_memory_manager_equals_the_logical_batch(mode: str) -> None:
    results = []
    for physical in (16, 4):
        model = mlp()
        x, y = data(16)
        opt = distopt.create("adamw", model.parameters(), lr=1e-2)
        out = make_private(model, opt, loader(x, y, 16), noise_multiplier=0.0, max_grad_norm=C,
                           grad_sample_mode=mode, poisson_sampling=False)
        module, dp_opt, dl = out[0], out[1], out[-1]
        criterion = out[2] if mode == "ghost" else None
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=physical, optimizer=dp_opt) as virtual:
            sizes = []
            for xb, yb in virtual:
                sizes.append(len(xb))
                train_step(module, dp_opt, xb, yb, criterion)
        assert max(sizes) <= physical and sum(sizes) == 16
        assert dp_opt.privacy.steps == 1  # one logical step accounted, not four
        results.append(([p.grad.clone() for p in dp_opt.params], [p.detach().clone() for p in model.parameters()]))
    (g_full, p_full), (g_virtual, p_virtual) = results
    for a, b in zip(g_full, g_virtual):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(p_full, p_virtual):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------- catalogue
BACKWARD = [n for n in distopt.available() if distopt.get(n).closure_kind == "backward"]
OTHER = [n for n in distopt.available() if distopt.get(n).closure_kind != "backward"]


@pytest.mark.parametrize("name", BACKWARD)
def test_every_backward_recipe_trains_privately(name: str) -> None:
    model = mlp(dtype=torch.float32)
    x, y = data(16, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = distopt.create(name, model.parameters(), lr=1e-2)
    module, dp_opt, dl = make_private(model, opt, loader(x, y, 8), noise_multiplier=1.0, max_grad_norm=C,
                                      noise_generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        for xb, yb in dl:
            train_step(module, dp_opt, xb, yb)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    eps, delta = dp_opt.privacy_spent()
    assert eps > 0 and delta == 1e-5


@pytest.mark.parametrize("name", OTHER or ["(none registered)"])
def test_registered_non_backward_recipes_are_refused(name: str) -> None:
    if name == "(none registered)":
        pytest.skip("no create_graph / forward recipe is registered yet; covered by the stand-ins below")
    model = mlp()
    x, y = data()
    kind = distopt.get(name).closure_kind
    with pytest.raises(NotPrivatizable, match="make_private_zo" if kind == "forward" else "create_graph"):
        make_private(model, distopt.create(name, model.parameters()), loader(x, y, 4), noise_multiplier=1.0,
                     max_grad_norm=C)


class _HessianStandIn(DistOptimizer):
    name, family, closure_kind = "hessian_stand_in", "second_order", "create_graph"


class _ZerothStandIn(DistOptimizer):
    name, family, closure_kind = "zeroth_stand_in", "zeroth_order", "forward"


class _LineSearchStandIn(DistOptimizer):
    name, family, reevaluates_closure = "line_search_stand_in", "first_order", True


@pytest.mark.parametrize("make_optimizer,match", [
    (lambda ps: _HessianStandIn(ps), r"hessian_stand_in.*create_graph=True"),
    (lambda ps: _ZerothStandIn(ps), r"zeroth_stand_in.*make_private_zo"),
    (lambda ps: _LineSearchStandIn(ps), r"line_search_stand_in.*re-evaluates the closure"),
    (lambda ps: torch.optim.LBFGS(ps), r"LBFGS.*re-evaluates the closure"),
])
def test_refusals_name_the_optimizer_and_the_alternative(make_optimizer, match: str) -> None:
    model = mlp()
    x, y = data()
    with pytest.raises(NotPrivatizable, match=match):
        make_private(model, make_optimizer(model.parameters()), loader(x, y, 4), noise_multiplier=1.0, max_grad_norm=C)
    assert not hasattr(next(model.parameters()), "grad_sample")  # refused before anything was wrapped


def test_optimizer_in_backward_is_refused() -> None:
    model = mlp()
    x, y = data()
    opt = distopt.create("adamw", model.parameters())
    handle = next(model.parameters()).register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(NotPrivatizable, match="optimizer-in-backward"):
        make_private(model, opt, loader(x, y, 4), noise_multiplier=1.0, max_grad_norm=C)
    handle.remove()
    make_private(model, opt, loader(x, y, 4), noise_multiplier=1.0, max_grad_norm=C)  # accepted once removed


def test_wrapping_twice_is_refused() -> None:
    model = mlp()
    x, y = data()
    _, dp_opt, _ = make_private(model, distopt.create("adamw", model.parameters()), loader(x, y, 4),
                                noise_multiplier=1.0, max_grad_norm=C)
    with pytest.raises(NotPrivatizable, match="already an Opacus DPOptimizer"):
        make_private(mlp(), dp_opt, loader(x, y, 4), noise_multiplier=1.0, max_grad_norm=C)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "exactly one of noise_multiplier"),
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0, "epochs": 1}, "exactly one of noise_multiplier"),
    ({"target_epsilon": 2.0}, "needs epochs"),
    ({"noise_multiplier": 1.0, "epochs": 3}, "epochs=3 is only used with target_epsilon"),
    ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
    ({"noise_multiplier": 1.0, "target_delta": 1.5}, "target_delta"),
    ({"noise_multiplier": 1.0, "accountant": "moments"}, "accountant"),
    ({"noise_multiplier": 1.0, "grad_sample_mode": "magic"}, "grad_sample_mode"),
    ({"noise_multiplier": 1.0, "budget": -2.0}, "budget"),
])
def test_invalid_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    model = mlp()
    x, y = data()
    kwargs = {"max_grad_norm": C, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_private(model, distopt.create("adamw", model.parameters()), loader(x, y, 4), **kwargs)
