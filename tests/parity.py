"""Parity harness: run a distopt optimizer and a reference side by side on the same problem.

The problem is a small tanh MLP regression in float64 whose parameters form two param
groups (layer 1: weight + bias, layer 2: weight + bias), each with its own hyperparameters.
Both optimizers start from identical parameters and see the same batches; each computes its
gradient at its own parameters. ``assert_parity`` compares parameters after ``steps``
steps by max relative deviation (``max|a-b| / max|b|`` per tensor) and records the figure
for the end-of-run table.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

RESULTS: list[tuple[str, str, float]] = []

Factory = Callable[[list[dict[str, Any]]], Any]


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 6), (8,), (3, 8), (3,)]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).to(dtype).requires_grad_() for s in shapes]


def loss_at(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64).to(params[0].dtype)
    y = torch.randn(16, 3, generator=g, dtype=torch.float64).to(params[0].dtype)
    w1, b1, w2, b2 = params
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


def groups_of(params: list[torch.Tensor], group_hparams: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    assert len(group_hparams) == 2, "two param groups with different hyperparameters"
    return [{"params": params[:2], **group_hparams[0]}, {"params": params[2:], **group_hparams[1]}]


def run(
    factory: Factory,
    group_hparams: Sequence[dict[str, Any]],
    steps: int = 100,
    dtype: torch.dtype = torch.float64,
    use_closure: bool = False,
    after_step: Callable[[Any, int], None] | None = None,
) -> list[torch.Tensor]:
    """Train with ``factory(groups)`` for ``steps`` steps; return the final parameters."""
    params = make_params(dtype)
    opt = factory(groups_of(params, group_hparams))
    for t in range(steps):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = loss_at(params, t)
            loss.backward()
            return loss

        if use_closure:
            opt.step(closure)
        else:
            closure()
            opt.step()
        if after_step is not None:
            after_step(opt, t)
    return [p.detach().clone() for p in params]


def max_rel_deviation(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item() for a, b in zip(ours, ref))


def assert_parity(
    case: str,
    ours: Factory,
    ref: Factory,
    group_hparams: Sequence[dict[str, Any]],
    reference: str,
    tol: float = 1e-10,
    steps: int = 100,
    ref_group_hparams: Sequence[dict[str, Any]] | None = None,
    **run_kwargs: Any,
) -> float:
    """Run both, record the deviation, and fail if it exceeds ``tol``. Also fails if the
    parameters did not move (a parity test of a no-op would pass trivially)."""
    a = run(ours, group_hparams, steps, **run_kwargs)
    b = run(ref, ref_group_hparams or group_hparams, steps, **run_kwargs)
    start = make_params(a[0].dtype)
    moved = min((x - s.detach()).abs().max().item() for x, s in zip(b, start))
    assert moved > 1e-6, f"{case}: the reference did not move the parameters; the test would be vacuous"
    deviation = max_rel_deviation(a, b)
    RESULTS.append((case, reference, deviation))
    assert deviation <= tol, f"{case}: max relative deviation {deviation:.3e} > {tol:.0e} against {reference}"
    return deviation
