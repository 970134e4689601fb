"""The zeroth-order shell's public per-example step (the hook DP-ZO privatizes through)."""
from __future__ import annotations

import pytest
import torch

import distopt
import distopt.zo  # noqa: F401  (registers the zeroth-order recipes)

ZO = [n for n in distopt.available() if getattr(distopt.get(n), "closure_kind", "") == "forward" and n != "zo_sgd_cons"]


def _problem(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    return net, torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)


def _per_example_loss(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((net(x) - y) ** 2).mean(1)


@pytest.mark.parametrize("name", ZO)
def test_mean_reduce_is_the_plain_step(name: str) -> None:
    """reduce = column means reproduces step() on the mean loss (the estimator is linear in the losses)."""
    a, x, y = _problem()
    b, _, _ = _problem()
    opt_a = distopt.create(name, a.parameters(), lr=1e-2)
    opt_b = distopt.create(name, b.parameters(), lr=1e-2)
    seen: list[torch.Tensor] = []

    def mean(per_example: torch.Tensor) -> list[float]:
        seen.append(per_example)
        return per_example.mean(0).tolist()

    for _ in range(5):
        la = opt_a.step(lambda: _per_example_loss(a, x, y).mean())
        lb = opt_b.step_per_example(lambda: _per_example_loss(b, x, y), mean)
        assert abs(la.item() - lb.item()) <= 1e-12 * abs(la.item())
    assert seen[0].shape[0] == 12 and seen[0].dtype == torch.float64
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
    moved = any(not torch.equal(p, q) for p, q in zip(a.parameters(), _problem()[0].parameters()))
    assert moved


def test_reduce_owns_the_scalars() -> None:
    """Whatever reduce returns is the step's scalar: zero scalars leave the weights unchanged (SGD, no decay)."""
    net, x, y = _problem()
    before = [p.detach().clone() for p in net.parameters()]
    opt = distopt.create("zo_sgd", net.parameters(), lr=1.0, record=True)
    opt.step_per_example(lambda: _per_example_loss(net, x, y), lambda pe: [0.0] * pe.shape[1])
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before))
    assert opt.log.steps[-1].scalars == [0.0]


def test_refuses_a_deciding_recipe() -> None:
    net, x, y = _problem()
    opt = distopt.create("zo_sgd_cons", net.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="decide"):
        opt.step_per_example(lambda: _per_example_loss(net, x, y), lambda pe: pe.mean(0).tolist())
