"""DP-AdamBC (Tang et al., AAAI 2024) through make_private(bias_correction=True), against a naive
float64 loop of the paper's update fed the same private gradients; ε is unchanged (post-processing)."""
from __future__ import annotations


import pytest
import torch

import distopt
from distopt.privacy import make_private
from privacy_helpers import data, loader, mlp, train_step

pytest.importorskip("opacus")
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")

SIGMA, C, BATCH, N = 1.0, 2.0, 6, 24


class NaiveDPAdamBC(torch.optim.Optimizer):
    """The paper's Algorithm, one tensor at a time (plus AdamW's decoupled or Adam's coupled decay):

        m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  m̂ = m/(1-β1^t);  v̂ = v/(1-β2^t)
        θ <- θ - lr · m̂ / sqrt(max(v̂ - Φ, γ'))        Φ = (σC/B)²
    """

    def __init__(self, params, lr, betas, weight_decay, decoupled, phi, floor):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        self.decoupled, self.phi, self.floor = decoupled, phi, floor
        self.below_floor = 0.0  # fraction of coordinates at the floor in the last step

    @torch.no_grad()
    def step(self):
        at_floor = total = 0
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad.clone()
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t = st["t"]
                if not self.decoupled:
                    g = g + wd * p
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                m_hat = st["m"] / (1 - b1**t)
                v_hat = st["v"] / (1 - b2**t)
                corrected = v_hat - self.phi
                at_floor += int((corrected < self.floor).sum())
                total += corrected.numel()
                if self.decoupled:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * m_hat / torch.sqrt(torch.clamp(corrected, min=self.floor)))
        self.below_floor = at_floor / total


def _run(name: str, bias_correction: bool, foreach: bool = True, steps: int = 8, floor: float = 1e-3):
    """Private training; returns (model, private optimizer, the private gradients of every step)."""
    model = mlp()
    x, y = data(N)
    hp = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99), "foreach": foreach}
    opt = distopt.create(name, model.parameters(), **hp)
    module, dp_opt, dl = make_private(model, opt, loader(x, y, BATCH), noise_multiplier=SIGMA, max_grad_norm=C,
                                      bias_correction=bias_correction, bias_correction_floor=floor,
                                      noise_generator=torch.Generator().manual_seed(0), accountant="rdp")
    grads, done = [], 0
    while done < steps:
        for xb, yb in dl:
            train_step(module, dp_opt, xb, yb)
            grads.append([p.grad.clone() for p in model.parameters()])
            done += 1
            if done == steps:
                break
    return model, dp_opt, grads, hp


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name,decoupled", [("adamw", True), ("adam", False)])
def test_matches_naive_dp_adambc_in_float64(name: str, decoupled: bool, foreach: bool) -> None:
    floor = 1e-3
    model, dp_opt, grads, hp = _run(name, True, foreach, floor=floor)
    b = dp_opt.expected_batch_size
    phi = (SIGMA * C / b) ** 2
    assert b == N // BATCH * BATCH / (N // BATCH) and dp_opt.noise_variance() == pytest.approx(phi, rel=1e-15)

    twin = mlp()
    naive = NaiveDPAdamBC(twin.parameters(), hp["lr"], hp["betas"], hp["weight_decay"], decoupled, phi, floor)
    fractions = []
    for g in grads:
        for p, gi in zip(twin.parameters(), g):
            p.grad = gi
        naive.step()
        fractions.append(naive.below_floor)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert 0.0 < max(fractions) and min(fractions) < 1.0, fractions  # both sides of max(v̂ - Φ, γ') were used

    plain = mlp()  # and it is not plain DP-Adam: the correction changes the trajectory
    adam = distopt.create(name, plain.parameters(), **hp)
    with torch.no_grad():
        for g in grads:
            for p, gi in zip(plain.parameters(), g):
                p.grad = gi
            adam.step()
    assert max(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), twin.parameters())) > 1e-3


def test_epsilon_is_unchanged() -> None:
    _, with_bc, _, _ = _run("adamw", True)
    _, without, _, _ = _run("adamw", False)
    assert with_bc.privacy_spent() == without.privacy_spent()
    assert with_bc.privacy.accountant.history == without.privacy.accountant.history


def test_muon_corrects_only_its_adamw_branch() -> None:
    x, y = data(N)
    model, twin = mlp(), mlp()
    opt = distopt.create("muon", model.parameters(), lr=1e-2, ns_dtype=None)
    plain = distopt.create("muon", twin.parameters(), lr=1e-2, ns_dtype=None)
    module, dp_opt, dl = make_private(model, opt, loader(x, y, BATCH), noise_multiplier=SIGMA, max_grad_norm=C,
                                      bias_correction=True, noise_generator=torch.Generator().manual_seed(0))
    for xb, yb in dl:
        train_step(module, dp_opt, xb, yb)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        plain.step()  # plain Muon on the same private gradients
    for p, q in zip(model.parameters(), twin.parameters()):
        if p.ndim >= 2:  # Newton–Schulz branch: no second moment, nothing to correct
            assert torch.equal(p, q)
        else:
            assert not torch.allclose(p, q)


@pytest.mark.parametrize("make_optimizer,match", [
    (lambda ps: distopt.create("lion", ps), "does not apply to 'lion'"),
    (lambda ps: distopt.create("adan", ps), "does not apply to 'adan'"),  # v of gradient differences
    (lambda ps: distopt.create("mars", ps), "does not apply to 'mars'"),  # v of the corrected gradient
    (lambda ps: distopt.create("adamw", ps, amsgrad=True), "amsgrad=True is not covered"),
    (lambda ps: torch.optim.Adam(ps), "needs a distopt Adam-family recipe"),
])
def test_refused_where_the_correction_would_be_wrong(make_optimizer, match: str) -> None:
    model = mlp()
    x, y = data()
    opt = make_optimizer(model.parameters())
    with pytest.raises(ValueError, match=match):
        make_private(model, opt, loader(x, y, 4), noise_multiplier=1.0, max_grad_norm=C, bias_correction=True)
    assert not hasattr(next(model.parameters()), "grad_sample")
    assert "recipe" not in vars(opt)  # nothing patched


def test_floor_must_be_positive() -> None:
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="bias_correction_floor"):
        make_private(model, distopt.create("adamw", model.parameters()), loader(x, y, 4), noise_multiplier=1.0,
                     max_grad_norm=C, bias_correction=True, bias_correction_floor=0.0)


def test_noise_variance_follows_world_and_reduction() -> None:
    """Φ is the variance of the noise in the gradient the recipe sees: (σC/B)² for 'mean', (σC)² for 'sum'."""
    model = mlp()
    x, y = data(N)
    opt = distopt.create("adamw", model.parameters())
    module, dp_opt, dl = make_private(model, opt, loader(x, y, BATCH), noise_multiplier=0.5, max_grad_norm=C,
                                      loss_reduction="sum", poisson_sampling=False, bias_correction=True)
    dp_opt.zero_grad()
    torch.nn.functional.cross_entropy(module(x[:BATCH]), y[:BATCH], reduction="sum").backward()
    dp_opt.step()
    assert dp_opt.noise_variance() == pytest.approx((0.5 * C) ** 2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
