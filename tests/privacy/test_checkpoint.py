"""The accountant inside the optimizer's state_dict (weights_only round trip, exact resume) and the
privacy budget: the step that would exceed it is refused before it runs."""
from __future__ import annotations

import copy
import io

import pytest
import torch

import distopt
from distopt.privacy import PrivacyBudgetExceeded, PrivacyState, make_private
from privacy_helpers import data, loader, mlp, train_step

pytest.importorskip("opacus")
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing",
                                        "ignore:Optimal order is the largest alpha")

SIGMA, C, N, BATCH = 1.5, 2.0, 64, 8
Q = BATCH / N


def _batches(k: int, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = data(N)
    g = torch.Generator().manual_seed(seed)
    return [(x[idx], y[idx]) for idx in (torch.randperm(N, generator=g)[:BATCH] for _ in range(k))]


def _private(model, accountant="rdp", budget=None, seed=0, name="adamw"):
    x, y = data(N)
    opt = distopt.create(name, model.parameters(), lr=1e-2)
    module, dp_opt, _ = make_private(model, opt, loader(x, y, BATCH), noise_multiplier=SIGMA, max_grad_norm=C,
                                     accountant=accountant, budget=budget,
                                     noise_generator=torch.Generator().manual_seed(seed))
    return module, dp_opt


def _save(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("name,accountant", [("adamw", "prv"), ("muon", "rdp")])
def test_resume_from_checkpoint_is_exact(name: str, accountant: str) -> None:
    batches = _batches(6)
    model = mlp()
    module, dp_opt = _private(model, accountant, name=name)
    for xb, yb in batches[:3]:
        train_step(module, dp_opt, xb, yb)
    checkpoint = _save({"model": model.state_dict(), "optimizer": dp_opt.state_dict()})
    for xb, yb in batches[3:]:
        train_step(module, dp_opt, xb, yb)

    loaded = torch.load(checkpoint, weights_only=True)  # no pickle of arbitrary objects
    assert loaded["optimizer"]["privacy"]["history"] == [[SIGMA, Q, 3]]
    resumed = mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(loaded["model"])
    module2, dp_opt2 = _private(resumed, accountant, seed=999, name=name)  # the generator state comes back too
    dp_opt2.load_state_dict(loaded["optimizer"])
    assert dp_opt2.privacy.steps == 3 and dp_opt2.privacy_spent()[0] == pytest.approx(
        _reference(accountant, 3).get_epsilon(1e-5), rel=1e-12)
    for xb, yb in batches[3:]:
        train_step(module2, dp_opt2, xb, yb)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert dp_opt2.privacy.accountant.history == dp_opt.privacy.accountant.history == [(SIGMA, Q, 6)]
    assert dp_opt2.privacy_spent() == dp_opt.privacy_spent()


def _reference(accountant: str, steps: int):
    acc = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=SIGMA, sample_rate=Q)
    return acc


def test_privacy_state_round_trip_and_mechanism_check() -> None:
    state = PrivacyState(RDPAccountant(), sample_rate=0.1, target_delta=1e-6, budget=4.0, noise_multiplier=1.2,
                         max_grad_norm=0.5, generator=torch.Generator().manual_seed(1))
    for sigma in (1.2, 1.2, 0.9):
        state.record(sigma)
    copy_ = PrivacyState(RDPAccountant(), sample_rate=0.5, target_delta=1e-3, generator=torch.Generator())
    copy_.load_state_dict(torch.load(_save(state.state_dict()), weights_only=True))
    assert copy_.accountant.history == [(1.2, 0.1, 2), (0.9, 0.1, 1)]
    assert copy_.spent() == state.spent() and copy_.budget == 4.0 and copy_.max_grad_norm == 0.5
    assert torch.equal(copy_.generator.get_state(), state.generator.get_state())
    with pytest.raises(ValueError, match="accountant is 'rdp'"):
        PrivacyState(PRVAccountant(), sample_rate=0.1, target_delta=1e-6).load_state_dict(state.state_dict())


def test_loading_a_non_private_state_warns() -> None:
    model = mlp()
    _, dp_opt = _private(model)
    plain = distopt.create("adamw", mlp().parameters(), lr=1e-2)
    with pytest.warns(UserWarning, match="no 'privacy' entry"):
        dp_opt.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_refuses_the_step_that_would_exceed_it(accountant: str) -> None:
    eps3, eps4 = (_reference(accountant, k).get_epsilon(1e-5) for k in (3, 4))
    budget = 0.5 * (eps3 + eps4)  # allows exactly 3 steps
    model = mlp()
    module, dp_opt = _private(model, accountant, budget=budget)
    assert dp_opt.privacy.remaining_steps() == 3
    batches = _batches(5)
    for xb, yb in batches[:3]:
        train_step(module, dp_opt, xb, yb)
    after_three = copy.deepcopy(model.state_dict())
    state_three = copy.deepcopy(dp_opt.state_dict())
    with pytest.raises(PrivacyBudgetExceeded, match="refused before running") as info:
        train_step(module, dp_opt, *batches[3])
    assert info.value.epsilon_spent == pytest.approx(eps3, rel=1e-12) and info.value.epsilon_spent <= budget
    assert info.value.epsilon_next == pytest.approx(eps4, rel=1e-12) and info.value.epsilon_next > budget
    assert info.value.steps == 3
    # nothing of the refused step happened: parameters, optimizer state and accountant are those after step 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, after_three[k])
    assert dp_opt.privacy.accountant.history == [(SIGMA, Q, 3)]
    assert dp_opt.privacy_spent()[0] == pytest.approx(eps3, rel=1e-12)
    assert int(dp_opt.state_dict()["state"][0]["step"]) == int(state_three["state"][0]["step"]) == 3
    # a valid checkpoint: it resumes under a larger budget
    resumed = mlp(seed=7)
    resumed.load_state_dict(after_three)
    module2, dp_opt2 = _private(resumed, accountant, budget=budget)
    dp_opt2.load_state_dict(torch.load(_save(dp_opt.state_dict()), weights_only=True))
    with pytest.raises(PrivacyBudgetExceeded):  # the budget travels with the checkpoint
        train_step(module2, dp_opt2, *batches[3])
    dp_opt2.privacy.budget = 2 * eps4
    train_step(module2, dp_opt2, *batches[3])
    assert dp_opt2.privacy.steps == 4


def test_budget_is_checked_per_logical_step_only() -> None:
    """Virtual (BatchMemoryManager-skipped) steps spend nothing and are never refused."""
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    eps1, eps2 = (_reference("rdp", k).get_epsilon(1e-5) for k in (1, 2))
    x, y = data(N)
    model = mlp()
    opt = distopt.create("adamw", model.parameters(), lr=1e-2)
    module, dp_opt, dl = make_private(model, opt, loader(x, y, BATCH), noise_multiplier=SIGMA, max_grad_norm=C,
                                      accountant="rdp", budget=0.5 * (eps1 + eps2), poisson_sampling=False)
    steps = 0
    with pytest.raises(PrivacyBudgetExceeded):
        with BatchMemoryManager(data_loader=dl, max_physical_batch_size=3, optimizer=dp_opt) as virtual:
            for xb, yb in virtual:
                train_step(module, dp_opt, xb, yb)
                steps += 1
    assert steps == 3 + 2  # first logical batch of 8 = 3 physical steps; the 2nd's first two are clipped only
    assert dp_opt.privacy.steps == 1
