"""Adam-mini against a naive per-tensor loop of the paper's update rule (Zhang et al.,
"Adam-mini: Use Fewer Learning Rates To Gain More", arXiv:2406.16793, Algorithm 1), float64,
100 steps, two param groups with different hyperparameters, foreach on and off.

pytorch_optimizer 4.1's ``AdamMini`` is not used as the reference: it takes a whole
``nn.Module`` and partitions by parameter *name* (Q/K weights by head, embeddings / lm_head
with a full Adam second moment, every other tensor, including MLP weights, as ONE block),
keeps its state in float32 whatever the param dtype, and applies weight decay per name
(none on norms). distopt partitions by shape (``block="row"``: one block per output row of a
tensor with ndim >= 2; ``"tensor"``: one block per tensor; ndim <= 1 always one block).
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import distopt
from parity import assert_parity

FOREACH = pytest.mark.parametrize("foreach", [True, False])


class NaiveAdamMini(torch.optim.Optimizer):
    """Algorithm 1 of the paper, one tensor and one block at a time, written with explicit
    Python loops over rows (no broadcasting): for each block b of p,
    m <- β1 m + (1-β1) g;  v_b <- β2 v_b + (1-β2) mean_b(g²);
    p <- p - lr·wd·p - lr · (m/(1-β1^t)) / (sqrt(v_b/(1-β2^t)) + ε)."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, block="row") -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block=block))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                # blocks: list of views into p / grad / m (rows of a matrix, or the whole tensor)
                per_row = group["block"] == "row" and p.dim() >= 2
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=[0.0] * (p.shape[0] if per_row else 1))
                st["t"] += 1
                t = st["t"]
                rows = range(p.shape[0]) if per_row else [None]
                new_p = p.clone()
                for k, r in enumerate(rows):
                    sel = (lambda x: x[r]) if per_row else (lambda x: x)
                    g, m, x = sel(p.grad), sel(st["m"]), sel(p)
                    m.copy_(b1 * m + (1 - b1) * g)
                    st["v"][k] = b2 * st["v"][k] + (1 - b2) * (g * g).sum().item() / g.numel()
                    m_hat = m / (1 - b1**t)
                    v_hat = st["v"][k] / (1 - b2**t)
                    sel(new_p).copy_(x - lr * wd * x - lr * m_hat / (math.sqrt(v_hat) + eps))
                p.copy_(new_p)


GROUPS = [dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
          dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0)]


def ours(foreach: bool, **kwargs: Any):
    return lambda groups: distopt.create("adam_mini", groups, foreach=foreach, **kwargs)


@FOREACH
@pytest.mark.parametrize("block", ["row", "tensor"])
def test_adam_mini_naive(foreach: bool, block: str) -> None:
    groups = [{**g, "block": block} for g in GROUPS]
    assert_parity(f"adam_mini block={block} (foreach={foreach})", ours(foreach), lambda gs: NaiveAdamMini(gs),
                  groups, reference="naive Adam-mini loop (paper Alg. 1)")


def test_adam_mini_mixed_blocks_per_group() -> None:
    groups = [{**GROUPS[0], "block": "row"}, {**GROUPS[1], "block": "tensor"}]
    assert_parity("adam_mini block=row|tensor", ours(True), lambda gs: NaiveAdamMini(gs), groups,
                  reference="naive Adam-mini loop (paper Alg. 1)")


@FOREACH
def test_adam_mini_maximize(foreach: bool) -> None:
    # maximize with gradient g must equal minimize with gradient -g
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(5)]
    finals = []
    for maximize in (True, False):
        p = torch.ones(6, 4, dtype=torch.float64, requires_grad=True)
        opt = distopt.create("adam_mini", [p], lr=1e-2, foreach=foreach, maximize=maximize, weight_decay=0.1)
        for grad in grads:
            p.grad = grad.clone() if maximize else -grad
            opt.step()
        finals.append(p.detach().clone())
    assert not torch.equal(finals[0], torch.ones(6, 4, dtype=torch.float64))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-14, atol=0)


def test_adam_mini_state_shapes() -> None:
    w, b, conv = torch.randn(7, 5, requires_grad=True), torch.randn(7, requires_grad=True), \
        torch.randn(4, 3, 2, 2, requires_grad=True)
    for block, shapes in (("row", [(7,), (), (4,)]), ("tensor", [(), (), ()])):
        opt = distopt.create("adam_mini", [w, b, conv], lr=1e-3, block=block)
        ((w**2).sum() + b.sum() + conv.sum()).backward()
        # the block moment is mean(g²) per row (first step: (1-β2) mean(g²))
        expected = 0.001 * (w.grad**2).mean(dim=1 if block == "row" else (0, 1))
        opt.step()
        for p, shape in zip((w, b, conv), shapes):
            state = opt.state[p]
            assert state["vmean"].shape == shape and state["vmean"].numel() == math.prod(shape)
            assert state["exp_avg"].shape == p.shape
        torch.testing.assert_close(opt.state[w]["vmean"], expected)
        w.grad = b.grad = conv.grad = None


def test_adam_mini_state_bytes_about_half_of_adamw() -> None:
    p = torch.randn(64, 32, requires_grad=True)
    sizes = {}
    for name in ("adam_mini", "adamw"):
        opt = distopt.create(name, [p], lr=1e-3)
        p.grad = torch.randn_like(p)
        opt.step()
        sizes[name] = sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
    assert sizes["adam_mini"] == 64 * 32 * 4 + 64 * 4 + 4  # exp_avg + vmean + step
    assert sizes["adam_mini"] < 0.55 * sizes["adamw"]


def test_adam_mini_rejects_bad_block() -> None:
    with pytest.raises(ValueError, match="block"):
        distopt.create("adam_mini", [torch.zeros(2, requires_grad=True)], block="head")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adam_mini_converges_least_squares(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 8, generator=g).to(dtype)
    b = torch.randn(20, generator=g).to(dtype)
    x = torch.zeros(8, 1, dtype=dtype, requires_grad=True)
    opt = distopt.create("adam_mini", [x], lr=3e-2, weight_decay=0.0)

    def loss() -> torch.Tensor:
        return ((a @ x).squeeze(1) - b).pow(2).sum()

    start = loss().item()
    best = torch.linalg.lstsq(a.double(), b.double().unsqueeze(1)).solution
    optimum = ((a.double() @ best).squeeze(1) - b.double()).pow(2).sum().item()
    for _ in range(1500):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert x.dtype == dtype
    assert loss().item() - optimum < 0.05 * (start - optimum)
