"""DP-ZO (make_private_zo): per-example projected-gradient scalars clipped to [-C, C], noise
N(0, σ²C²) on their sum, divided by the expected batch size, accounted by Opacus."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call

import distopt
from distopt.core.shell import DistOptimizer
from distopt.privacy import NotPrivatizable, PrivacyBudgetExceeded, TwoPointEstimator, make_private_zo
from privacy_helpers import data, loader, mlp

pytest.importorskip("opacus")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

EPS = 1e-4


def per_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: nn.functional.cross_entropy(model(x), y, reduction="none")


def _private(model, c=0.5, sigma=0.0, batch=12, n=12, poisson=False, name="sgd", **kw):
    x, y = data(n)
    opt = distopt.create(name, model.parameters(), **kw.pop("hparams", {"lr": 0.1}))
    module, dp_opt, dl = make_private_zo(model, opt, loader(x, y, batch), noise_multiplier=sigma, max_grad_norm=c,
                                         poisson_sampling=poisson, zo_eps=EPS, **kw)
    return module, dp_opt, dl, (x, y)


def _by_hand_scalars(model: nn.Module, x, y, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """s_i = (ℓ_i(θ+εz) - ℓ_i(θ-εz)) / 2ε, out of place, with z regenerated from the seed in parameter order."""
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    z = {n: torch.randn(theta[n].shape, generator=gen, dtype=theta[n].dtype) for n in names}
    loss = lambda params: nn.functional.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")  # noqa: E731
    plus = loss({n: theta[n] + EPS * z[n] for n in names})
    minus = loss({n: theta[n] - EPS * z[n] for n in names})
    return (plus - minus).detach() / (2 * EPS), z


def test_sigma_zero_scalar_is_the_clipped_mean_and_the_update_is_along_z() -> None:
    model = mlp()
    c = 2.0
    module, dp_opt, _, (x, y) = _private(model, c=c)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    seed = dp_opt._seed()
    scalars, z = _by_hand_scalars(model, x, y, seed)
    assert (scalars.abs() > c).sum() >= 2 and (scalars.abs() < c).sum() >= 2, scalars
    expected = float(scalars.clamp(-c, c).sum() / len(x))
    with torch.no_grad():
        loss_before = float(nn.functional.cross_entropy(model(x), y))

    loss = dp_opt.step(per_example(module, x, y))
    assert dp_opt.projected_grad == pytest.approx(expected, rel=1e-8)
    assert float(loss) == pytest.approx(loss_before, rel=1e-6)  # mean of ℓ(θ ± εz) = ℓ(θ) + O(ε²)
    for n, p in model.named_parameters():  # sgd: θ <- θ - lr ĝ z
        torch.testing.assert_close(p.detach(), theta0[n] - 0.1 * expected * z[n], rtol=1e-10, atol=1e-12)
    assert dp_opt.privacy.steps == 1


def test_each_example_moves_the_scalar_by_at_most_c() -> None:
    model = mlp()
    c = 0.3
    module, dp_opt, _, (x, y) = _private(model, c=c, hparams={"lr": 0.0})
    b = dp_opt.expected_batch_size
    contributions = []
    for i in range(len(x)):
        dp_opt.step(per_example(module, x[i:i + 1], y[i:i + 1]))
        contributions.append(abs(dp_opt.projected_grad * b))
    assert max(contributions) <= c * (1 + 1e-12)
    assert sum(abs(v - c) < 1e-12 for v in contributions) >= 2


def test_noise_std_is_sigma_c_over_batch() -> None:
    model = mlp()
    sigma, c, trials = 1.7, 0.4, 20000
    _, dp_opt, _, _ = _private(model, c=c, sigma=sigma, noise_generator=torch.Generator().manual_seed(0))
    scalars = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64)
    clean = float(scalars.clamp(-c, c).sum() / dp_opt.expected_batch_size)
    noise = torch.tensor([float(dp_opt.private_scalar(scalars)) - clean for _ in range(trials)])
    assert abs(float(noise.std()) / (sigma * c / dp_opt.expected_batch_size) - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * sigma * c / dp_opt.expected_batch_size / trials**0.5


@pytest.mark.parametrize("mechanism,rel", [("rdp", 1e-6), ("prv", 1e-3)])
def test_epsilon_equals_opacus_accountant(mechanism: str, rel: float) -> None:
    model = mlp()
    sigma, steps = 0.9, 9
    module, dp_opt, dl, _ = _private(model, sigma=sigma, batch=4, n=32, poisson=True, accountant=mechanism,
                                     noise_generator=torch.Generator().manual_seed(1))
    done = 0
    for xb, yb in itertools.islice(itertools.cycle(dl), 100):
        if len(xb) == 0:
            continue
        dp_opt.step(per_example(module, xb, yb))
        done += 1
        if done == steps:
            break
    reference = {"rdp": RDPAccountant, "prv": PRVAccountant}[mechanism]()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=4 / 32)
    assert dp_opt.privacy_spent()[0] == pytest.approx(reference.get_epsilon(1e-5), rel=rel)


def test_target_epsilon_calibrates_sigma() -> None:
    model = mlp()
    x, y = data(32)
    _, dp_opt, _ = make_private_zo(model, distopt.create("sgd", model.parameters(), lr=0.1), loader(x, y, 8),
                                   target_epsilon=3.0, epochs=5, max_grad_norm=1.0, accountant="rdp")
    assert dp_opt.noise_multiplier == get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=8 / 32,
                                                           epochs=5, accountant="rdp")


def test_zo_adam_update_rule_is_post_processing() -> None:
    """Any backward-kind recipe can be the update rule: it sees p.grad = ĝ z, nothing else."""
    model, twin = mlp(), mlp()
    module, dp_opt, _, (x, y) = _private(model, sigma=1.0, name="adamw", hparams={"lr": 1e-2},
                                         noise_generator=torch.Generator().manual_seed(0))
    plain = distopt.create("adamw", twin.parameters(), lr=1e-2)
    estimator = TwoPointEstimator(list(twin.parameters()), EPS)
    for _ in range(4):
        seed = dp_opt._seed()
        dp_opt.step(per_example(module, x, y))
        for p, z in zip(twin.parameters(), estimator.directions(seed)):
            p.grad = z * dp_opt.projected_grad
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


ZO_RECIPES = [n for n in distopt.available() if distopt.get(n).closure_kind == "forward"]
PLUGGABLE = [n for n in ZO_RECIPES if n != "zo_sgd_cons"]


@pytest.mark.parametrize("name", PLUGGABLE or ["(none registered)"])
def test_zeroth_order_recipe_plugs_in_and_equals_its_own_step_without_clipping_or_noise(name: str) -> None:
    """σ = 0 and C too large to clip: DP-ZO's private scalars are the recipe's own (mean of the
    per-example scalars = scalars of the mean loss), so parameters follow the recipe's own step."""
    if name == "(none registered)":
        pytest.skip("no distopt.zo recipe registered")
    model, twin = mlp(), mlp()
    x, y = data(12)
    hp = {"lr": 1e-2, "eps": 1e-3, "seed": 3}
    _, dp_opt, _ = make_private_zo(model, distopt.create(name, model.parameters(), **hp), loader(x, y, 12),
                                   noise_multiplier=0.0, max_grad_norm=1e9, poisson_sampling=False)
    plain = distopt.create(name, twin.parameters(), **hp)
    for _ in range(3):
        loss = dp_opt.step(per_example(model, x, y))
        plain_loss = plain.step(lambda: nn.functional.cross_entropy(twin(x), y))
        assert float(loss) == pytest.approx(float(plain_loss), rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert not torch.equal(next(model.parameters()), next(mlp().parameters()))
    assert len(dp_opt.private_scalars) == (2 if name == "hizoo" else 1)


@pytest.mark.parametrize("name", PLUGGABLE or ["(none registered)"])
def test_zeroth_order_recipe_scalars_are_clipped_per_example(name: str) -> None:
    if name == "(none registered)":
        pytest.skip("no distopt.zo recipe registered")
    model = mlp()
    x, y = data(12)
    c = 0.05
    _, dp_opt, _ = make_private_zo(model, distopt.create(name, model.parameters(), lr=0.0), loader(x, y, 12),
                                   noise_multiplier=0.0, max_grad_norm=c, poisson_sampling=False)
    norms = []
    for i in range(len(x)):
        dp_opt.step(per_example(model, x[i:i + 1], y[i:i + 1]))
        norms.append(float(torch.tensor(dp_opt.private_scalars, dtype=torch.float64).norm()) * dp_opt.expected_batch_size)
    assert max(norms) <= c * (1 + 1e-9) and sum(abs(n - c) < 1e-9 for n in norms) >= 2


def test_zeroth_order_recipe_with_noise_accounts_each_step() -> None:
    model = mlp()
    x, y = data(32)
    _, dp_opt, dl = make_private_zo(model, distopt.create("zo_adam", model.parameters(), lr=1e-3), loader(x, y, 8),
                                    noise_multiplier=1.1, max_grad_norm=1.0, accountant="rdp",
                                    noise_generator=torch.Generator().manual_seed(0))
    for xb, yb in dl:
        if len(xb):
            dp_opt.step(per_example(model, xb, yb))
    reference = RDPAccountant()
    for _ in range(dp_opt.privacy.steps):
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
    assert dp_opt.privacy.steps >= 3
    assert dp_opt.privacy_spent()[0] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6)


class _BareZeroth(DistOptimizer):
    name, family, closure_kind = "bare_zeroth", "zeroth_order", "forward"


class _Hessian(DistOptimizer):
    name, family, closure_kind = "hessian_stand_in_zo", "second_order", "create_graph"


@pytest.mark.parametrize("make_optimizer,match", [
    (lambda ps: _BareZeroth(ps), r"bare_zeroth.*not a distopt.zo.ZOOptimizer"),
    (lambda ps: _Hessian(ps), r"hessian_stand_in_zo.*create_graph"),
    (lambda ps: torch.optim.LBFGS(ps), r"LBFGS.*re-evaluates the closure"),
    *([(lambda ps: distopt.create("zo_sgd_cons", ps), r"zo_sgd_cons chooses among candidate steps")]
      if "zo_sgd_cons" in ZO_RECIPES else []),
])
def test_refusals(make_optimizer, match: str) -> None:
    model = mlp()
    x, y = data()
    with pytest.raises(NotPrivatizable, match=match):
        make_private_zo(model, make_optimizer(model.parameters()), loader(x, y, 4), noise_multiplier=1.0,
                        max_grad_norm=1.0)


def test_closure_must_return_per_example_losses() -> None:
    module, dp_opt, _, (x, y) = _private(mlp())
    with pytest.raises(ValueError, match="per-example losses"):
        dp_opt.step(lambda: nn.functional.cross_entropy(module(x), y))


def test_checkpoint_round_trip_and_budget() -> None:
    x, y = data(32)
    eps2, eps3 = (RDPAccountant() for _ in range(2))
    for k, acc in ((2, eps2), (3, eps3)):
        for _ in range(k):
            acc.step(noise_multiplier=1.2, sample_rate=0.25)
    budget = 0.5 * (eps2.get_epsilon(1e-5) + eps3.get_epsilon(1e-5))

    def build(model, seed):
        return make_private_zo(model, distopt.create("adamw", model.parameters(), lr=1e-2), loader(x, y, 8),
                               noise_multiplier=1.2, max_grad_norm=1.0, accountant="rdp", budget=budget,
                               poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed), seed=seed)

    model = mlp()
    module, dp_opt, _ = build(model, 0)
    dp_opt.step(per_example(module, x[:8], y[:8]))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": dp_opt.state_dict()}, buffer)
    dp_opt.step(per_example(module, x[8:16], y[8:16]))
    with pytest.raises(PrivacyBudgetExceeded):
        dp_opt.step(per_example(module, x[16:24], y[16:24]))
    assert dp_opt.privacy.steps == 2

    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=9)
    resumed.load_state_dict(loaded["model"])
    module2, dp_opt2, _ = build(resumed, 7)
    dp_opt2.load_state_dict(loaded["optimizer"])
    dp_opt2.step(per_example(module2, x[8:16], y[8:16]))
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert dp_opt2.privacy_spent() == dp_opt.privacy_spent()


def test_dp_zo_reduces_the_loss() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 6, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 2)).double()
    _, dp_opt, dl = make_private_zo(model, distopt.create("sgd", model.parameters(), lr=0.5), loader(x, y, 64),
                                    noise_multiplier=0.5, max_grad_norm=2.0, noise_generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = float(nn.functional.cross_entropy(model(x), y))
    for _ in range(30):
        for xb, yb in dl:
            if len(xb):
                dp_opt.step(per_example(model, xb, yb))
    with torch.no_grad():
        assert float(nn.functional.cross_entropy(model(x), y)) < 0.6 * start
