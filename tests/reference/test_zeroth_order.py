"""Zeroth-order family: estimator accuracy, each recipe against a naive float64 loop of its
paper's rule, exact restoration, the memory bound, and seed replay.

The naive references below are written from the papers (and the authors' code where the paper
leaves a detail open), one tensor at a time, perturbing parameters in place as MeZO does
(restoring from a copy). They share only the direction *generator* with distopt
(``distopt.zo.perturb.generate`` keyed by ``derive_key(seed, step, k, tag)`` over the flat model
vector); the estimator, the perturbation machinery and the update chains are distopt's own.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

import pytest
import torch
from torch.func import jvp

import distopt
import distopt.zo
from distopt.zo.estimator import TAG_U, TAG_V, TAG_Z
from distopt.zo.memory import LiveBytes
from distopt.zo.perturb import WORKSPACE_BYTES_PER_ELEMENT, clear_workspace, derive_key, generate
from parity import RESULTS, groups_of, loss_at, make_params, max_rel_deviation

STEPS = 100


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# directions, regenerated independently of the optimizer
# ---------------------------------------------------------------------------------------------
def _rows_cols(p: torch.Tensor) -> tuple[int, int]:
    rows = p.shape[0] if p.dim() else 1
    return rows, p.numel() // max(rows, 1)


def z_of(params: list[torch.Tensor], seed: int, step: int, k: int, dist: str = "gaussian") -> list[torch.Tensor]:
    """z for every parameter: the flat model vector's entries base .. base + numel."""
    out, base = [], 0
    for p in params:
        rows, cols = _rows_cols(p)
        z = generate(derive_key(seed, step, k, TAG_Z), base, cols, slice(0, rows), dist)
        out.append(z.to(torch.float64).view(p.shape))
        base += p.numel()
    return out


# ---------------------------------------------------------------------------------------------
# naive references: torch.optim.Optimizer subclasses, one tensor at a time, in float64
# ---------------------------------------------------------------------------------------------
class NaiveZO(torch.optim.Optimizer):
    """MeZO's loop (Malladi et al. 2023, Alg. 1): perturb in place, evaluate, restore, update."""

    def __init__(self, params: Any, **defaults: Any) -> None:
        super().__init__(params, defaults)
        self.t = 0

    def flat(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def hp(self, key: str) -> Any:
        return self.param_groups[0][key]

    def directions(self, k: int) -> list[torch.Tensor]:
        return z_of(self.flat(), self.hp("seed"), self.t, k, self.hp("distribution"))

    def evaluate_at(self, closure: Callable, values: list[torch.Tensor]) -> float:
        saved = [p.clone() for p in self.flat()]
        for p, v in zip(self.flat(), values):
            p.copy_(v)
        loss = float(closure())
        for p, s in zip(self.flat(), saved):
            p.copy_(s)
        return loss

    def probe(self, closure: Callable, dirs: list[torch.Tensor], scale: float) -> float:
        return self.evaluate_at(closure, [p + scale * d for p, d in zip(self.flat(), dirs)])

    def projected(self, closure: Callable, dirs: list[torch.Tensor], f0: float | None) -> float:
        eps = self.hp("eps")
        fp = self.probe(closure, dirs, eps)
        if self.hp("two_sided"):
            return (fp - self.probe(closure, dirs, -eps)) / (2 * eps)
        return (fp - f0) / eps

    def estimate(self, closure: Callable) -> list[torch.Tensor]:
        n = self.hp("n")
        f0 = None if self.hp("two_sided") else float(closure())
        g = [torch.zeros_like(p) for p in self.flat()]
        for k in range(n):
            dirs = self.directions(k)
            c = self.projected(closure, dirs, f0)
            for gi, d in zip(g, dirs):
                gi.add_(c * d / n)
        return g

    def groups_with(self, g: list[torch.Tensor]):
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p, g[i]
                i += 1

    @torch.no_grad()
    def step(self, closure: Callable) -> None:  # type: ignore[override]
        self.t += 1
        g = self.estimate(closure)
        for group, p, gi in self.groups_with(g):
            self.apply(group, p, gi)

    def apply(self, group: dict, p: torch.Tensor, g: torch.Tensor) -> None:
        p.sub_(group["lr"] * (g + group["weight_decay"] * p))


class NaiveSign(NaiveZO):
    def apply(self, group, p, g):
        p.sub_(group["lr"] * (torch.sign(g) + group["weight_decay"] * p))


class NaiveMomentum(NaiveZO):
    def apply(self, group, p, g):
        u = g + group["weight_decay"] * p
        st = self.state[p]
        st["b"] = u.clone() if "b" not in st else group["momentum"] * st["b"] + u
        p.sub_(group["lr"] * st["b"])


class NaiveAdam(NaiveZO):
    def apply(self, group, p, g):
        b1, b2 = group["betas"]
        u = g + group["weight_decay"] * p
        st = self.state[p]
        st.setdefault("m", torch.zeros_like(p))
        st.setdefault("v", torch.zeros_like(p))
        st["m"] = b1 * st["m"] + (1 - b1) * u
        st["v"] = b2 * st["v"] + (1 - b2) * u * u
        mhat, vhat = st["m"] / (1 - b1**self.t), st["v"] / (1 - b2**self.t)
        p.sub_(group["lr"] * mhat / (vhat.sqrt() + group["adam_eps"]))


class NaiveCons(NaiveZO):
    """ZO-Bench zo_conserv_step: best of θ, θ - lr u, θ + lr u (its tie-breaking)."""

    @torch.no_grad()
    def step(self, closure):
        self.t += 1
        f0 = float(closure())
        g = self.estimate(closure)
        cand = {s: [p - s * group["lr"] * (gi + group["weight_decay"] * p) for group, p, gi in self.groups_with(g)]
                for s in (1.0, -1.0)}
        l1, l2 = self.evaluate_at(closure, cand[1.0]), self.evaluate_at(closure, cand[-1.0])
        choice = (0.0 if f0 < l2 else -1.0) if l1 > f0 else (1.0 if l1 < l2 else -1.0)
        if choice:
            for p, v in zip(self.flat(), cand[choice]):
                p.copy_(v)


class NaiveHiZOO(NaiveZO):
    """Zhao et al. (ICLR 2025) Alg. 1 / zo_Hessian_step_update, averaged over n directions."""

    @torch.no_grad()
    def step(self, closure):
        self.t += 1
        eps, n = self.hp("eps"), self.hp("n")
        ps = self.flat()
        for p in ps:
            self.state[p].setdefault("H", torch.ones_like(p))
        f0 = float(closure())
        zs, cs, curv = [], [], []
        for k in range(n):
            z = self.directions(k)
            d = [zi / self.state[p]["H"].sqrt() for zi, p in zip(z, ps)]
            lp, lm = self.probe(closure, d, eps), self.probe(closure, d, -eps)
            zs.append(z)
            cs.append((lp - lm) / (2 * eps))
            curv.append(abs(lp + lm - 2 * f0) / (2 * eps * eps))
        i = 0
        for group in self.param_groups:
            a = group["hessian_smooth"]
            for p in group["params"]:
                H = self.state[p]["H"]
                est = sum(curv[k] * H * zs[k][i] ** 2 for k in range(n)) / n
                H_new = (1 - a) * H + a * est
                self.state[p]["H"] = H_new
                grad = sum(cs[k] * zs[k][i] for k in range(n)) / n / H_new.sqrt()
                p.sub_(group["lr"] * (grad + group["weight_decay"] * p))
                i += 1


class NaiveLOZO(NaiveZO):
    """Chen et al. (ICLR 2025) Alg. 1: d = U Vᵀ for matrices (V redrawn every `interval` steps)."""

    def directions(self, k):
        out, dirs = z_of(self.flat(), self.hp("seed"), self.t, k, self.hp("distribution")), []
        i = 0
        for group in self.param_groups:
            r, nu = group["rank"], group["interval"]
            for p in group["params"]:
                if p.dim() >= 2:
                    rows, cols = _rows_cols(p)
                    epoch = (self.t - 1) // nu
                    u = generate(derive_key(self.hp("seed"), self.t, k, TAG_U, i), 0, r, slice(0, rows), "gaussian")
                    v = generate(derive_key(self.hp("seed"), epoch, k, TAG_V, i), 0, r, slice(0, cols), "gaussian")
                    dirs.append((u.double() @ v.double().T).view(p.shape))
                else:
                    dirs.append(out[i])
                i += 1
        return dirs


class NaiveSparse(NaiveZO):
    """Liu et al. 2024: d = 1[|θ| <= h] z, h the ceil((1-s)N)-th smallest |θ_0| per tensor."""

    def directions(self, k):
        z = z_of(self.flat(), self.hp("seed"), self.t, k, self.hp("distribution"))
        out = []
        for (group, p, zi) in self.groups_with(z):
            st = self.state[p]
            if "h" not in st:
                kth = max(1, math.ceil((1 - group["sparsity"]) * p.numel()))
                st["h"] = torch.kthvalue(p.abs().flatten(), kth).values.item()
            out.append(zi * (p.abs() <= st["h"]))
        return out


STEP = {"eps": 1e-3, "n": 2, "two_sided": True, "distribution": "gaussian", "seed": 7}
CASES = {
    "zo_sgd": (NaiveZO, [{"lr": 2e-2, "weight_decay": 0.1}, {"lr": 1e-2}], {"n": 1}),
    "zo_sgd/one_sided_rademacher": (NaiveZO, [{"lr": 1e-2}, {"lr": 5e-3, "weight_decay": 0.05}],
                                    {"n": 3, "two_sided": False, "distribution": "rademacher"}),
    "zo_sgd_sign": (NaiveSign, [{"lr": 1e-3, "weight_decay": 0.1}, {"lr": 5e-4}], {}),
    "zo_sgd_momentum": (NaiveMomentum, [{"lr": 5e-3, "weight_decay": 0.1, "momentum": 0.9},
                                        {"lr": 2e-3, "momentum": 0.5}], {}),
    "zo_sgd_cons": (NaiveCons, [{"lr": 2e-2, "weight_decay": 0.1}, {"lr": 1e-2}], {}),
    "zo_adam": (NaiveAdam, [{"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.99), "adam_eps": 1e-8},
                            {"lr": 2e-3, "betas": (0.8, 0.999), "adam_eps": 1e-6}], {}),
    "hizoo": (NaiveHiZOO, [{"lr": 1e-2, "weight_decay": 0.1, "hessian_smooth": 1e-2},
                           {"lr": 5e-3, "hessian_smooth": 1e-3}], {}),
    "lozo": (NaiveLOZO, [{"lr": 1e-2, "weight_decay": 0.1, "rank": 2, "interval": 7},
                         {"lr": 5e-3, "rank": 3, "interval": 4}], {}),
    "sparse_mezo": (NaiveSparse, [{"lr": 2e-2, "weight_decay": 0.1, "sparsity": 0.5},
                                  {"lr": 1e-2, "sparsity": 0.75}], {}),
}


def _run(factory: Callable, groups_hp: list[dict], steps: int = STEPS) -> list[torch.Tensor]:
    params = make_params()
    opt = factory(groups_of(params, groups_hp))
    for t in range(steps):
        opt.step(lambda: loss_at(params, t))
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_matches_naive_paper_loop(case: str, foreach: bool) -> None:
    naive_cls, groups_hp, step_hp = CASES[case]
    name = case.split("/")[0]
    hp = {**STEP, **step_hp}
    ours = _run(lambda groups: distopt.create(name, groups, foreach=foreach, **hp), groups_hp)
    ref = _run(lambda groups: naive_cls(groups, **{**hp, "weight_decay": 0.0}), groups_hp)
    start = make_params()
    assert min((b - s.detach()).abs().max().item() for b, s in zip(ref, start)) > 1e-6, "reference did not move"
    dev = max_rel_deviation(ours, ref)
    RESULTS.append((f"{case} foreach={foreach}", f"naive float64 loop ({naive_cls.__name__})", dev))
    assert dev <= 1e-10, f"{case}: max relative deviation {dev:.3e} against the naive loop"


# ---------------------------------------------------------------------------------------------
# the estimator
# ---------------------------------------------------------------------------------------------
def _smooth(params: list[torch.Tensor]) -> torch.Tensor:
    return loss_at(params, 0) + sum((torch.sin(3 * p) ** 2).sum() for p in params)


def test_projected_gradient_is_directional_derivative_to_second_order() -> None:
    """(f(θ+εz) - f(θ-εz)) / 2ε = ∇f·z + O(ε²): halving ε divides the error by ~4."""
    params = [p.detach() for p in make_params()]
    z = z_of(params, seed=3, step=1, k=0)
    _, exact = jvp(lambda *ps: _smooth(list(ps)), tuple(params), tuple(z))
    errors = []
    for eps in (4e-2, 2e-2, 1e-2):
        work = [p.clone().requires_grad_() for p in params]
        opt = distopt.create("zo_sgd", work, lr=0.0, eps=eps, seed=3, record=True)
        opt.step(lambda: _smooth(work))
        errors.append(abs(opt.log.steps[0].scalars[0] - exact.item()))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.6 < r < 4.4 for r in ratios), (errors, ratios)
    assert errors[-1] < 2e-3 * abs(exact.item())   # 1.5e-3 at ε = 1e-2: sin(3θ) has a large third derivative


def test_estimator_mean_is_the_gradient_on_a_quadratic() -> None:
    """E[c z] = ∇f for f quadratic (two-sided SPSA has no bias there). 1500 directions, fixed
    seed; every coordinate within 4.5 standard errors, and the norm of the error within twice its
    expected size sqrt((d + 1) / n) |∇f| (≈ 0.093 |∇f| here; Var(c z) = |g|² I + g gᵀ for Gaussian z)."""
    g = torch.Generator().manual_seed(0)
    d = 12
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    hess = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)

    def f() -> torch.Tensor:
        return 0.5 * theta @ hess @ theta + b @ theta

    true = (hess @ theta + b).detach()
    n = 1500
    start = theta.detach().clone()
    opt = distopt.create("zo_sgd", [theta], lr=1.0, n=n, seed=11, record=True)
    opt.step(f)
    mean = start - theta.detach()                          # lr = 1: the step is -g
    c = torch.tensor(opt.log.steps[0].scalars, dtype=torch.float64)
    samples = torch.stack([z_of([theta], 11, 1, k)[0] for k in range(n)]) * c[:, None]
    assert torch.allclose(samples.mean(0), mean, rtol=1e-9, atol=1e-12)
    se = samples.std(0) / math.sqrt(n)
    assert ((mean - true).abs() <= 4.5 * se).all(), ((mean - true) / se)
    assert (mean - true).norm() / true.norm() < 2 * math.sqrt((d + 1) / n)


def test_generator_is_standard_normal_and_chunk_invariant() -> None:
    z = generate(derive_key(1, 2, 3), 0, 1, slice(0, 1 << 20), "gaussian").view(-1).double()
    assert abs(z.mean()) < 5 / 1024 and abs(z.var() - 1) < 0.01 and abs((z**4).mean() - 3) < 0.05
    ks = torch.distributions.Normal(0.0, 1.0).cdf(z[:20000].sort().values) - torch.arange(20000) / 20000
    assert ks.abs().max() < 1.36 / math.sqrt(20000) + 1e-4           # KS at 5%
    parts = torch.cat([generate(derive_key(1, 2, 3), 0, 1, slice(s, min(s + 997, 5000)), "gaussian").view(-1)
                       for s in range(0, 5000, 997)])
    assert torch.equal(parts, z[:5000].float())
    idx = torch.randperm(5000)
    assert torch.equal(generate(derive_key(1, 2, 3), 0, 1, idx, "gaussian").view(-1), z[:5000].float()[idx])
    r = generate(derive_key(1, 2, 3), 0, 1, slice(0, 1 << 16), "rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.02


# ---------------------------------------------------------------------------------------------
# exact restoration and memory
# ---------------------------------------------------------------------------------------------
class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 96, dim: int = 32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.up = torch.nn.Linear(dim, 4 * dim)
        self.norm = torch.nn.LayerNorm(4 * dim)
        self.head = torch.nn.Linear(4 * dim, vocab, bias=False)
        self.to(dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.nn.functional.gelu(self.up(self.emb(ids))))
        logits = self.head(h).float()
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("mode", ["on_use", "in_place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_sided_step_with_lr_zero_is_bit_exact(dtype: torch.dtype, mode: str) -> None:
    model = TinyLM(dtype=dtype)
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in model.parameters()]
    for name in ("zo_sgd", "hizoo", "lozo", "sparse_mezo", "zo_sgd_cons"):
        opt = distopt.create(name, model.parameters(), lr=0.0, eps=1e-2, n=2, perturbation=mode, chunk_size=1024)
        losses = [float(opt.step(lambda: model(ids))) for _ in range(3)]
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before)), name
        assert len(set(losses)) == 3 or name in ("hizoo", "zo_sgd_cons")  # probes moved the loss


def test_on_use_and_in_place_give_the_same_trajectory() -> None:
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for mode in ("on_use", "in_place"):
        model = TinyLM(dtype=torch.float64)
        opt = distopt.create("zo_sgd", model.parameters(), lr=1e-2, perturbation=mode, chunk_size=1024)
        for _ in range(5):
            opt.step(lambda: model(ids))
        results.append([p.detach().clone() for p in model.parameters()])
    assert max_rel_deviation(*results) < 1e-12


def _peak(fn: Callable[[], Any]) -> int:
    with LiveBytes() as mem:
        fn()
    return mem.peak


@pytest.mark.parametrize("name", ["zo_sgd", "zo_sgd_cons", "lozo"])
def test_extra_memory_is_bounded(name: str) -> None:
    """Extra bytes of a ZO step over forward-only inference, counted exactly (LiveBytes):
    on_use <= the largest parameter read by a generic op (here the LayerNorm weight: F.linear
    and F.embedding are chunked) + chunk scratch; in_place <= all parameters + chunk scratch."""
    chunk = 2048
    model = TinyLM(vocab=512, dim=64)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    clear_workspace()
    scratch = chunk * (WORKSPACE_BYTES_PER_ELEMENT + 4 * 8)    # generator workspace + a few chunk-sized rows
    generic_max = max(model.norm.weight.numel(), model.up.bias.numel()) * 4 * 2   # weight and bias of one op
    with torch.no_grad():
        inference = _peak(lambda: model(ids))
    for mode, allowance in (("on_use", generic_max), ("in_place", sum(p.numel() * 4 for p in model.parameters()))):
        opt = distopt.create(name, model.parameters(), lr=1e-3, perturbation=mode, chunk_size=chunk)
        clear_workspace()
        step = _peak(lambda: opt.step(lambda: model(ids)))
        extra = step - inference
        assert extra <= allowance + scratch, (mode, extra, allowance, scratch)
    largest = max(p.numel() for p in model.parameters()) * 4
    assert largest > generic_max + scratch   # the bound is below "one copy of the largest tensor"


# ---------------------------------------------------------------------------------------------
# replay
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zo_sgd", "zo_adam", "zo_sgd_cons", "hizoo", "lozo", "sparse_mezo"])
def test_replay_rebuilds_the_weights_bit_exactly(name: str) -> None:
    model = TinyLM()
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    initial = [p.detach().clone() for p in model.parameters()]
    opt = distopt.create(name, [{"params": [model.emb.weight, model.up.weight, model.up.bias]},
                                {"params": [model.norm.weight, model.norm.bias, model.head.weight], "lr": 2e-3}],
                         lr=5e-3, n=2, record=True, chunk_size=1024)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    for _ in range(8):
        opt.step(lambda: model(ids))
        sched.step()
    text = opt.log.to_json()
    fresh = TinyLM()
    with torch.no_grad():
        for p, p0 in zip(fresh.parameters(), initial):
            p.copy_(p0)
    distopt.zo.replay(fresh, text)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert not torch.equal(initial[0], model.emb.weight)
    size = opt.log.bytes_per_step()
    if name != "zo_sgd_cons":   # cons adds 8 bytes on steps that did not take the plain step
        assert size["binary"] == 16 + 8 * ((4 if name == "hizoo" else 2) + 2)
    assert size["json"] < 200
    json.loads(text)


def test_step_needs_a_closure_and_skips_frozen() -> None:
    model = TinyLM()
    model.emb.weight.requires_grad_(False)
    frozen = model.emb.weight.detach().clone()
    opt = distopt.create("zo_sgd", model.parameters(), lr=1e-2)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    ids = torch.randint(0, 96, (2, 8))
    opt.step(lambda: model(ids))
    assert torch.equal(model.emb.weight, frozen) and len(opt.state[model.emb.weight]) == 0
    with pytest.raises(ValueError, match="eps"):
        distopt.create("zo_sgd", [{"params": [model.up.weight], "eps": 1e-3},
                                  {"params": [model.up.bias], "eps": 1e-2}])
