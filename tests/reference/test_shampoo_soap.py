"""Shampoo and SOAP against naive references written here, plus their degenerate equalities.

- ``NaiveShampoo``: one tensor and one block at a time, (L/c2 + εI)^{-1/4} G (R/c2 + εI)^{-1/4}
  with roots from a plain 2-D ``torch.linalg.eigh``; blocks from ``torch.tensor_split`` (an
  independent spelling of distopt's near-equal blocking). distopt stacks same-shape blocks and runs
  one batched ``bmm`` / ``eigh``.
- ``NaiveSOAP``: the reference ``soap.py`` (github.com/nikhilvyas/SOAP) step by step, per tensor,
  with ``tensordot`` projections, the exp_avg back-and-forth projection on *every* step and
  ``index_select`` permutations, in float64. What the reference itself does differently: it keeps
  GG and Q in float32 whatever the parameter dtype (``torch.zeros`` default dtype, ``.float()``),
  so a float64 run of the package is not a float64 computation; the naive loop keeps them in the
  parameter's dtype, as distopt does. There is no installable SOAP package to compare with.
- Grafting-only runs (preconditioning starts after the horizon) equal torch.optim.AdamW / Adam /
  Adagrad / RMSprop / SGD exactly as the definitions say they must.

SOAP's test problem avoids eigenspaces of dimension > 1 at the first step (a (6, 5) matrix has a
rank-5 6x6 factor: a 1-D null space, fixed up to sign): inside a degenerate eigenspace the basis
eigh returns is arbitrary, Adam in that basis is not invariant, and any two correct implementations
would then differ by O(1) (the naive 1-D factors are exact outer products, bit-identical in both).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import pytest
import torch

import distopt
import parity
from parity import assert_parity
from distopt.preconditioners import linalg
from distopt.preconditioners.blocks import block_layout, block_slices, split_sizes

HORIZON = 10**6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is fastest, and torch.linalg.qr (in the naive SOAP) with several
    threads on a busy 2-core machine takes milliseconds per 6x6 call."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# Naive Shampoo
# ----------------------------------------------------------------------------------------------
def _blocks(mat: torch.Tensor, max_dim: int) -> list[list[torch.Tensor]]:
    """Row-major grid of block views by torch.tensor_split into ceil(d / max_dim) parts."""
    rows = torch.tensor_split(mat, math.ceil(mat.shape[0] / max_dim), dim=0)
    return [list(torch.tensor_split(r, math.ceil(mat.shape[1] / max_dim), dim=1)) for r in rows]


def _naive_root(a: torch.Tensor, root: int, eps: float) -> torch.Tensor:
    lam, q = torch.linalg.eigh(a)
    return q @ torch.diag((lam.clamp_min(0) + eps) ** (-1.0 / root)) @ q.T


class NaiveShampoo(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 1.0), epsilon: float = 1e-12,
                 momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = True, max_preconditioner_dim: int = 1024,
                 precondition_frequency: int = 10, start_preconditioning_step: int | None = None,
                 grafting: str = "adam", grafting_beta2: float = 0.999, grafting_eps: float = 1e-8,
                 use_bias_correction: bool = True, precondition_1d: bool = False) -> None:
        super().__init__(params, dict(
            lr=lr, betas=betas, epsilon=epsilon, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay, max_preconditioner_dim=max_preconditioner_dim,
            precondition_frequency=precondition_frequency, start_preconditioning_step=start_preconditioning_step,
            grafting=grafting, grafting_beta2=grafting_beta2, grafting_eps=grafting_eps,
            use_bias_correction=use_bias_correction, precondition_1d=precondition_1d))

    @torch.no_grad()
    def step(self) -> None:
        for gr in self.param_groups:
            b1, b2 = gr["betas"]
            f, eps, B = gr["precondition_frequency"], gr["epsilon"], gr["max_preconditioner_dim"]
            start = gr["start_preconditioning_step"] or f
            for p in gr["params"]:
                g = p.grad.clone()
                if not gr["decoupled_weight_decay"]:
                    g = g + gr["weight_decay"] * p
                st = self.state[p]
                matrix = p.dim() >= 2 or gr["precondition_1d"]
                mat = (lambda x: x.reshape(x.shape[0], -1)) if p.dim() >= 2 else (lambda x: x.reshape(-1, 1))
                if not st:
                    st["t"], st["m"], st["acc"], st["buf"] = 0, torch.zeros_like(p), torch.zeros_like(p), None
                    st["diag"] = torch.zeros_like(p)
                    if matrix:
                        grid = _blocks(mat(p), B)
                        st["L"] = [[torch.zeros(b.shape[0], b.shape[0], dtype=p.dtype) for b in row] for row in grid]
                        st["R"] = [[torch.zeros(b.shape[1], b.shape[1], dtype=p.dtype) for b in row] for row in grid]
                        st["Lr"] = [[torch.eye(b.shape[0], dtype=p.dtype) for b in row] for row in grid]
                        st["Rr"] = [[torch.eye(b.shape[1], dtype=p.dtype) for b in row] for row in grid]
                st["t"] += 1
                t = st["t"]
                # grafting statistics of the raw gradient
                if gr["grafting"] == "adagrad":
                    st["acc"] += g * g
                elif gr["grafting"] in ("rmsprop", "adam"):
                    st["acc"] = gr["grafting_beta2"] * st["acc"] + (1 - gr["grafting_beta2"]) * g * g
                ema = (lambda old, new: old + new) if b2 == 1.0 else (lambda old, new: b2 * old + (1 - b2) * new)
                if matrix:
                    for i, row in enumerate(_blocks(mat(g), B)):
                        for j, gb in enumerate(row):
                            st["L"][i][j] = ema(st["L"][i][j], gb @ gb.T)
                            st["R"][i][j] = ema(st["R"][i][j], gb.T @ gb)
                else:
                    st["diag"] = ema(st["diag"], g * g)
                # filtered gradient
                if b1 > 0:
                    st["m"] = b1 * st["m"] + (1 - b1) * g
                    mh = st["m"] / (1 - b1**t) if gr["use_bias_correction"] else st["m"]
                else:
                    mh = g
                c2 = 1 - b2**t if gr["use_bias_correction"] and b2 < 1 else 1.0
                # grafting direction
                kind = gr["grafting"]
                if kind in ("adagrad", "rmsprop"):
                    D = mh / (st["acc"].sqrt() + gr["grafting_eps"])
                elif kind == "adam":
                    c = 1 - gr["grafting_beta2"] ** t if gr["use_bias_correction"] else 1.0
                    D = mh / ((st["acc"] / c).sqrt() + gr["grafting_eps"])
                else:
                    D = mh
                u = D
                if t >= start and matrix:
                    two = p.dim() >= 2
                    if t % f == 0 or t == start:
                        for i, row in enumerate(st["L"]):
                            for j in range(len(row)):
                                st["Lr"][i][j] = _naive_root(st["L"][i][j] / c2, 4 if two else 2, eps)
                                st["Rr"][i][j] = _naive_root(st["R"][i][j] / c2, 4, eps)
                    out = torch.zeros_like(mat(p))
                    out_grid = _blocks(out, B)
                    for i, (mrow, drow) in enumerate(zip(_blocks(mat(mh), B), _blocks(mat(D), B))):
                        for j, (mb, db) in enumerate(zip(mrow, drow)):
                            s = st["Lr"][i][j] @ mb @ st["Rr"][i][j] if two else st["Lr"][i][j] @ mb
                            if kind != "none":
                                s = s * (db.norm() / s.norm())
                            out_grid[i][j].copy_(s)
                    u = out.reshape(p.shape)
                elif t >= start and kind == "none":
                    u = mh / (st["diag"] / c2 + eps).sqrt()
                if gr["momentum"] > 0:
                    st["buf"] = u.clone() if st["buf"] is None else gr["momentum"] * st["buf"] + u
                    u = u + gr["momentum"] * st["buf"] if gr["nesterov"] else st["buf"]
                if gr["decoupled_weight_decay"]:
                    p.mul_(1 - gr["lr"] * gr["weight_decay"])
                p.add_(u, alpha=-gr["lr"])


SHAMPOO_GROUPS = [
    # plain Shampoo: no grafting, AdaGrad-style sums, roots every step, diagonal vectors, decoupled wd
    dict(lr=0.02, betas=(0.9, 1.0), epsilon=1e-6, grafting="none", precondition_frequency=1,
         weight_decay=0.01),
    # blocked (max dim 4: (3, 8) -> 1 x 2 blocks), Adam grafting, EMA factors with bias correction,
    # start after the first root, 1-D preconditioned, Nesterov momentum, coupled weight decay
    dict(lr=0.01, betas=(0.5, 0.99), epsilon=1e-8, grafting="adam", grafting_beta2=0.95, grafting_eps=1e-6,
         precondition_frequency=3, start_preconditioning_step=5, max_preconditioner_dim=4, precondition_1d=True,
         momentum=0.5, nesterov=True, weight_decay=0.05, decoupled_weight_decay=False),
]
SHAMPOO_GROUPS_B = [
    # blocked first layer ((8, 6) with max dim 3: rows 3 + 3 + 2, columns 3 + 3 -> 6 blocks of two shapes),
    # AdaGrad grafting, no bias correction, float64 roots asked explicitly, 1-D blocked (8 -> 3 + 3 + 2)
    dict(lr=0.05, betas=(0.0, 0.9), epsilon=1e-7, grafting="adagrad", grafting_eps=1e-10, max_preconditioner_dim=3,
         precondition_frequency=2, start_preconditioning_step=2, use_bias_correction=False, root_dtype=torch.float64,
         precondition_1d=True),
    # SGD grafting, momentum without Nesterov, decoupled weight decay
    dict(lr=0.03, betas=(0.7, 0.999), epsilon=1e-9, grafting="sgd", precondition_frequency=4, momentum=0.3,
         weight_decay=0.1),
]


def _naive_kwargs(groups: Sequence[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k not in ("root_dtype", "inverse_root_method")} for g in groups]


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("case,groups", [("A", SHAMPOO_GROUPS), ("B", SHAMPOO_GROUPS_B)])
def test_shampoo_equals_naive_full_matrix(case: str, groups: list[dict], foreach: bool) -> None:
    assert_parity(
        f"shampoo {case} (foreach={foreach})",
        lambda gs: distopt.create("shampoo", gs, foreach=foreach),
        lambda gs: NaiveShampoo(gs), groups, "naive L^-1/4 G R^-1/4 per block",
        ref_group_hparams=_naive_kwargs(groups))


def test_shampoo_rmsprop_grafting_and_float32_roots_of_float64() -> None:
    groups = [dict(lr=0.02, betas=(0.9, 0.99), grafting="rmsprop", grafting_beta2=0.9, epsilon=1e-6,
                   precondition_frequency=5),
              dict(lr=0.01, betas=(0.0, 1.0), grafting="rmsprop", grafting_beta2=0.99, epsilon=1e-6,
                   precondition_frequency=1, max_preconditioner_dim=5)]
    assert_parity("shampoo rmsprop grafting", lambda gs: distopt.create("shampoo", gs),
                  lambda gs: NaiveShampoo(gs), groups, "naive L^-1/4 G R^-1/4 per block")
    # float32 roots of float64 statistics: same trajectory to float32 accuracy
    dev = parity.max_rel_deviation(
        parity.run(lambda gs: distopt.create("shampoo", gs, root_dtype=torch.float32), groups),
        parity.run(lambda gs: NaiveShampoo(gs), groups))
    assert dev < 1e-3


def test_shampoo_coupled_newton_matches_eigh() -> None:
    groups = [dict(lr=0.02, betas=(0.9, 0.99), epsilon=1e-4, grafting="adam", precondition_frequency=2),
              dict(lr=0.01, betas=(0.0, 1.0), epsilon=1e-4, grafting="none", precondition_frequency=1)]
    newton = parity.run(lambda gs: distopt.create("shampoo", gs, inverse_root_method="coupled_newton"), groups)
    naive = parity.run(lambda gs: NaiveShampoo(gs), groups)
    dev = parity.max_rel_deviation(newton, naive)
    parity.RESULTS.append(("shampoo coupled_newton (tol 1e-10)", "naive eigh roots", dev))
    assert dev < 1e-7


# ---- degenerate configurations: preconditioning never starts, grafting only ----
def _graft_only(**kw: Any) -> dict:
    return dict(start_preconditioning_step=HORIZON, precondition_frequency=7, **kw)


@pytest.mark.parametrize("foreach", [True, False])
def test_shampoo_adam_grafting_is_adamw_and_adam(foreach: bool) -> None:
    ours = [_graft_only(lr=0.01, betas=(0.9, 1.0), grafting="adam", grafting_beta2=0.999, grafting_eps=1e-8,
                        weight_decay=0.1),
            _graft_only(lr=0.003, betas=(0.8, 0.9), grafting="adam", grafting_beta2=0.95, grafting_eps=1e-6)]
    ref = [dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
           dict(lr=0.003, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)]
    assert_parity(f"shampoo graft=adam = AdamW (foreach={foreach})",
                  lambda gs: distopt.create("shampoo", gs, foreach=foreach),
                  lambda gs: torch.optim.AdamW(gs, foreach=foreach), ours, "torch.optim.AdamW", ref_group_hparams=ref)
    coupled = [dict(g, decoupled_weight_decay=False, weight_decay=0.05) for g in ours]
    ref_c = [dict(g, weight_decay=0.05) for g in ref]
    assert_parity(f"shampoo graft=adam coupled = Adam (foreach={foreach})",
                  lambda gs: distopt.create("shampoo", gs, foreach=foreach),
                  lambda gs: torch.optim.Adam(gs, foreach=foreach), coupled, "torch.optim.Adam",
                  ref_group_hparams=ref_c)


def test_shampoo_adagrad_rmsprop_sgd_grafting_are_torch() -> None:
    cases = [
        ("adagrad", torch.optim.Adagrad,
         [_graft_only(lr=0.05, betas=(0.0, 1.0), grafting="adagrad", grafting_eps=1e-10, weight_decay=0.01,
                      decoupled_weight_decay=False),
          _graft_only(lr=0.02, betas=(0.0, 0.9), grafting="adagrad", grafting_eps=1e-6)],
         [dict(lr=0.05, eps=1e-10, weight_decay=0.01), dict(lr=0.02, eps=1e-6)]),
        ("rmsprop", torch.optim.RMSprop,
         [_graft_only(lr=0.005, betas=(0.0, 1.0), grafting="rmsprop", grafting_beta2=0.99, grafting_eps=1e-8,
                      weight_decay=0.01, decoupled_weight_decay=False),
          _graft_only(lr=0.002, betas=(0.0, 1.0), grafting="rmsprop", grafting_beta2=0.9, grafting_eps=1e-6,
                      momentum=0.5)],
         [dict(lr=0.005, alpha=0.99, eps=1e-8, weight_decay=0.01), dict(lr=0.002, alpha=0.9, eps=1e-6, momentum=0.5)]),
        ("sgd", torch.optim.SGD,
         [_graft_only(lr=0.05, betas=(0.0, 1.0), grafting="sgd", momentum=0.9, nesterov=True, weight_decay=0.01,
                      decoupled_weight_decay=False),
          _graft_only(lr=0.1, betas=(0.0, 1.0), grafting="none", momentum=0.5)],
         [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), dict(lr=0.1, momentum=0.5)]),
    ]
    for kind, cls, ours, ref in cases:
        assert_parity(f"shampoo graft={kind} = {cls.__name__}", lambda gs: distopt.create("shampoo", gs),
                      lambda gs, cls=cls: cls(gs), ours, f"torch.optim.{cls.__name__}", ref_group_hparams=ref)


# ---- blocks, 1-D groups, failures ----
def test_block_slices_tile_the_matrix_view() -> None:
    assert split_sizes(2304, 1024) == (768, 768, 768)
    assert split_sizes(10, 4) == (4, 3, 3) and split_sizes(4, 4) == (4,) and split_sizes(1, 9) == (1,)
    for shape, max_dim in [((8, 6), 3), ((2304, 768), 1024), ((16, 3, 3, 3), 10), ((13,), 4), ((), 4)]:
        blocks = block_slices(shape, max_dim)
        m, n = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (math.prod(shape), 1)
        cover = torch.zeros(m, n, dtype=torch.int64)
        for sl in blocks:
            view = cover[sl] if len(sl) == 2 else cover[sl[0]]
            assert all(s.stop - s.start <= max_dim for s in sl)
            view += 1
        assert torch.equal(cover, torch.ones_like(cover)), shape
    assert block_slices((8,), 4, precondition_1d=False) == [] and block_layout((8,), 4, False) is None


@pytest.mark.parametrize("grafting", ["none", "adam", "adagrad"])
@pytest.mark.parametrize("precondition_1d", [False, True])
def test_shampoo_group_of_only_vectors(grafting: str, precondition_1d: bool) -> None:
    def run(factory: Any) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(3)
        params = [torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn((), generator=g, dtype=torch.float64, requires_grad=True)]
        target = torch.randn(7, generator=g, dtype=torch.float64)
        opt = factory(params)
        for _ in range(60):
            opt.zero_grad()
            loss = ((params[0] - target) ** 2 * torch.arange(1, 8)).sum() + (params[1] - 2) ** 2
            loss.backward()
            opt.step()
        return [p.detach() for p in params] + [loss.detach()]

    hp = dict(lr=0.3 if grafting == "adagrad" else 0.1, betas=(0.5, 0.99), epsilon=1e-4, grafting=grafting,
              precondition_frequency=2, max_preconditioner_dim=3, precondition_1d=precondition_1d)
    ours, ref = run(lambda ps: distopt.create("shampoo", ps, **hp)), run(lambda ps: NaiveShampoo(ps, **hp))
    assert parity.max_rel_deviation(ours[:2], ref[:2]) < 1e-10
    assert ours[2] < 0.1  # and it optimises (the loss starts near 30)


def _tiny_run(opt_factory: Any, steps: int = 6) -> tuple[Any, list[torch.Tensor]]:
    params = parity.make_params()
    opt = opt_factory(parity.groups_of(params, [{}, {}]))
    for t in range(steps):
        opt.zero_grad()
        parity.loss_at(params, t).backward()
        opt.step()
    return opt, params


def test_shampoo_eigh_failure_keeps_previous_root(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh, calls = torch.linalg.eigh, {"n": 0}

    def failing_eigh(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # the solver fails on the first batched call and again on the first matrix retried alone:
        # exactly one root cannot be computed
        calls["n"] += 1
        if calls["n"] <= 2:
            raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge (test)")
        return real_eigh(a, *args, **kwargs)

    factory = lambda gs: distopt.create("shampoo", gs, precondition_frequency=2, grafting="adam", lr=0.01)  # noqa: E731
    clean, _ = _tiny_run(factory, steps=2)
    monkeypatch.setattr(torch.linalg, "eigh", failing_eigh)
    opt, params = _tiny_run(factory, steps=2)
    failures = sum(int(s["root_failures"]) for s in opt.state.values())
    assert failures == 1
    assert all(torch.isfinite(p).all() for p in params)
    # the failed matrix kept its previous root (the initial identity); the others were computed
    kept = [(k, s) for s in opt.state.values() for k in s if "_root_" in k
            and torch.equal(s[k], torch.eye(s[k].shape[0], dtype=s[k].dtype))]
    assert len(kept) == 1
    monkeypatch.setattr(torch.linalg, "eigh", real_eigh)
    _tiny_run(factory, steps=2)  # nothing left patched


def test_shampoo_non_finite_root_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh, calls = torch.linalg.eigh, {"n": 0}

    def nan_eigh(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        lam, q = real_eigh(a, *args, **kwargs)
        if calls["n"] == 1:
            lam = lam.clone()
            lam[0, 0] = float("nan")
        return lam, q

    monkeypatch.setattr(torch.linalg, "eigh", nan_eigh)
    opt, params = _tiny_run(lambda gs: distopt.create("shampoo", gs, precondition_frequency=1, lr=0.01), steps=3)
    assert sum(int(s["root_failures"]) for s in opt.state.values()) == 1
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_shampoo_non_finite_gradient_raises(bad: float) -> None:
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, dtype=torch.float64, requires_grad=True)
    opt = distopt.create("shampoo", [v, w], lr=0.1, precondition_frequency=1)
    (w.sum() + v.sum()).backward()
    opt.step()
    before = [w.detach().clone(), v.detach().clone()]
    w.grad[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"shape \(4, 3\)"):
        opt.step()
    assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])


def test_shampoo_bfloat16_state_survives_state_dict() -> None:
    w = torch.randn(6, 5, requires_grad=True)
    wb = w.detach().to(torch.bfloat16).requires_grad_()
    opt = distopt.create("shampoo", [wb], lr=0.01, precondition_frequency=1)
    for _ in range(3):
        opt.zero_grad()
        (wb.float() ** 2).sum().backward()
        opt.step()
    st = opt.state[wb]
    assert st["L_0"].dtype == torch.float32 and st["root_failures"].dtype == torch.int64
    fresh = distopt.create("shampoo", [wb], lr=0.01, precondition_frequency=1)
    fresh.load_state_dict(opt.state_dict())
    for k, v in st.items():
        assert fresh.state[wb][k].dtype == v.dtype and torch.equal(fresh.state[wb][k], v), k


def test_inverse_root_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    a = x @ x.mT
    ref = torch.stack([_naive_root(m, 4, 1e-3) for m in a])
    for method, tol in [("eigh", 1e-12), ("coupled_newton", 1e-8)]:
        root, ok = linalg.inverse_root(a, 4, 1e-3, method)
        assert ok.all() and (root - ref).abs().max() < tol * ref.abs().max(), method
    # a factor that lost positive definiteness to round-off: eigh clamps, coupled Newton diverges
    # and must report the failure instead of returning a finite wrong root
    bad = a.clone()
    bad[1] -= 2 * torch.linalg.eigvalsh(a[1]).min() * torch.eye(5, dtype=torch.float64)  # λ_min -> -λ_min
    root, ok = linalg.inverse_root(bad, 4, 1e-6, "coupled_newton")
    assert ok.tolist() == [True, False, True] and torch.isfinite(root[[0, 2]]).all()
    assert linalg.inverse_root(bad, 4, 1e-6, "eigh")[1].all()


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_group_mixing_dtypes(name: str) -> None:
    ps = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, requires_grad=True),
          torch.randn(4, 3).to(torch.bfloat16).requires_grad_(),
          torch.randn(3, dtype=torch.float64, requires_grad=True)]
    opt = distopt.create(name, ps, lr=0.01, precondition_frequency=1)
    for _ in range(4):
        opt.zero_grad()
        sum((p.double() - 1).pow(2).sum() for p in ps).backward()
        opt.step()
    assert [p.dtype for p in ps] == [torch.float64, torch.float32, torch.bfloat16, torch.float64]
    assert all(torch.isfinite(p.double()).all() for p in ps)


def test_shampoo_declares_matrix_locality() -> None:
    cls = distopt.get("shampoo")
    recipe = cls.recipe({k: h.default for k, h in cls.hyperparameters().items()})
    assert recipe.locality == distopt.Locality.MATRIX


def test_shampoo_invalid_combinations() -> None:
    p = [torch.zeros(3, 3, requires_grad=True)]
    for bad in [dict(betas=(0.9, 0.0)), dict(betas=(1.0, 1.0)), dict(grafting="lamb"), dict(max_preconditioner_dim=0),
                dict(start_preconditioning_step=0), dict(inverse_root_method="qr"), dict(root_dtype=torch.float16)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            distopt.create("shampoo", p, **bad)


# ----------------------------------------------------------------------------------------------
# SOAP
# ----------------------------------------------------------------------------------------------
def _merge(shape: Sequence[int], max_dim: int) -> list[int]:
    new, cur = [], 1
    for sh in shape:
        if cur * sh > max_dim:
            if cur > 1:
                new.append(cur)
                cur = sh
            else:
                new.append(sh)
                cur = 1
        else:
            cur *= sh
    if cur > 1 or not new:
        new.append(cur)
    return new


class NaiveSOAP(torch.optim.Optimizer):
    """The reference soap.py's step, per tensor (channels_first; GG/Q in the parameter's dtype)."""

    def __init__(self, params: Any, lr: float = 3e-3, betas: tuple = (0.95, 0.95), shampoo_beta: float = -1,
                 eps: float = 1e-8, weight_decay: float = 0.01, precondition_frequency: int = 10,
                 max_precond_dim: int = 10000, merge_dims: bool = False, precondition_1d: bool = False,
                 normalize_grads: bool = False, correct_bias: bool = True) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                                      precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                                      merge_dims=merge_dims, precondition_1d=precondition_1d,
                                      normalize_grads=normalize_grads, correct_bias=correct_bias))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                grad, state = p.grad, self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                if "Q" not in state:
                    sb = group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]
                    self._init(grad, state, group, sb)
                    self._update_preconditioner(grad, state, group)
                    continue
                gp = self._project(grad, state, group)
                b1, b2 = group["betas"]
                state["step"] += 1
                state["exp_avg"].mul_(b1).add_(gp, alpha=1.0 - b1)
                state["exp_avg_sq"].mul_(b2).add_(gp.square(), alpha=1.0 - b2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size = step_size * (1.0 - b2 ** state["step"]) ** 0.5 / (1.0 - b1 ** state["step"])
                norm_grad = self._project_back(state["exp_avg"] / denom, state, group)
                if group["normalize_grads"]:
                    norm_grad = norm_grad / (1e-30 + torch.mean(norm_grad**2) ** 0.5)
                p.add_(norm_grad, alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
                self._update_preconditioner(grad, state, group)

    def _shape(self, x: torch.Tensor, group: dict) -> torch.Tensor:
        return x.reshape(_merge(x.shape, group["max_precond_dim"])) if group["merge_dims"] else x

    def _init(self, grad: torch.Tensor, state: dict, group: dict, shampoo_beta: float) -> None:
        state["GG"] = []
        if grad.dim() == 1:
            ok = group["precondition_1d"] and grad.shape[0] <= group["max_precond_dim"]
            state["GG"].append(torch.zeros(grad.shape[0], grad.shape[0], dtype=grad.dtype) if ok else [])
        else:
            for sh in self._shape(grad, group).shape:
                state["GG"].append(torch.zeros(sh, sh, dtype=grad.dtype) if sh <= group["max_precond_dim"] else [])
        state["Q"], state["shampoo_beta"] = None, shampoo_beta

    def _project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        shape = grad.shape
        grad = self._shape(grad, group)
        for mat in state["Q"]:
            if len(mat) > 0:
                grad = torch.tensordot(grad, mat, dims=[[0], [0]])
            else:
                grad = grad.permute(list(range(1, grad.dim())) + [0])
        return grad.reshape(shape)

    def _project_back(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        shape = grad.shape
        grad = self._shape(grad, group)
        for mat in state["Q"]:
            if len(mat) > 0:
                grad = torch.tensordot(grad, mat, dims=[[0], [1]])
            else:
                grad = grad.permute(list(range(1, grad.dim())) + [0])
        return grad.reshape(shape)

    def _update_preconditioner(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        if state["Q"] is not None:
            state["exp_avg"] = self._project_back(state["exp_avg"], state, group)
        if grad.dim() == 1:
            if len(state["GG"][0]) > 0:
                state["GG"][0].lerp_(grad.unsqueeze(1) @ grad.unsqueeze(0), 1 - state["shampoo_beta"])
        else:
            g = self._shape(grad, group)
            for idx, sh in enumerate(g.shape):
                if len(state["GG"][idx]) > 0:
                    others = [d for d in range(g.dim()) if d != idx]
                    state["GG"][idx].lerp_(torch.tensordot(g, g, dims=[others, others]), 1 - state["shampoo_beta"])
        if state["Q"] is None:
            state["Q"] = [torch.linalg.eigh(m + 1e-30 * torch.eye(m.shape[0], dtype=m.dtype))[1].flip(1)
                          if len(m) > 0 else [] for m in state["GG"]]
        if state["step"] > 0 and state["step"] % group["precondition_frequency"] == 0:
            state["Q"] = self._qr(state, group)
        if state["step"] > 0:
            state["exp_avg"] = self._project(state["exp_avg"], state, group)

    def _qr(self, state: dict, group: dict) -> list:
        shape = state["exp_avg_sq"].shape
        exp_avg_sq = self._shape(state["exp_avg_sq"], group)
        final = []
        for ind, (m, o) in enumerate(zip(state["GG"], state["Q"])):
            if len(m) == 0:
                final.append([])
                continue
            est_eig = torch.diag(o.T @ m @ o)
            sort_idx = torch.argsort(est_eig, descending=True)
            exp_avg_sq = exp_avg_sq.index_select(ind, sort_idx)
            o = o[:, sort_idx]
            final.append(torch.linalg.qr(m @ o)[0])
        state["exp_avg_sq"] = exp_avg_sq.reshape(shape)
        return final


SOAP_SHAPES = [(6, 5), (3,), (2, 3, 4), (5, 6), (5,), (2, 2, 5)]


def _soap_params() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 0.5).requires_grad_() for s in SOAP_SHAPES]


def _soap_loss(params: Sequence[torch.Tensor], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randn(16, 5, generator=g, dtype=torch.float64)
    w1, c, t3, w2, b2, t4 = params
    out = torch.tanh(x @ w1.T) @ w2.T + b2 + torch.tanh(t4).reshape(4, 5).sum(0) * x
    z3, z1 = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)
    return ((out - y) ** 2).mean() + (torch.sin(t3) * z3).sum() ** 2 + (torch.tanh(c) * z1).sum() ** 2


# the 3-vector's factor is rank 1 at step 1 (an exact outer product: bit-identical GG and eigh in both)
# and full rank at the first QR refresh (4 gradients); with a rank-deficient GG at a refresh, the
# estimated eigenvalues of the null space are round-off and their sort order, hence the basis, is arbitrary
SOAP_GROUPS = [
    dict(lr=0.01, betas=(0.9, 0.95), shampoo_beta=0.9, eps=1e-8, weight_decay=0.01, precondition_frequency=3,
         precondition_1d=True),
    dict(lr=0.02, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.0, precondition_frequency=5, max_precond_dim=5,
         merge_dims=True, normalize_grads=True, correct_bias=False),
]


def _run_soap(factory: Any, hparams: Sequence[dict], steps: int = 100) -> list[torch.Tensor]:
    params = _soap_params()
    opt = factory([{"params": params[:3], **hparams[0]}, {"params": params[3:], **hparams[1]}])
    for t in range(steps):
        opt.zero_grad()
        _soap_loss(params, t).backward()
        opt.step()
    return [p.detach().clone() for p in params]


def _assert_soap_parity(case: str, ours: Any, hparams: Sequence[dict], tol: float = 1e-10) -> float:
    a, b = _run_soap(ours, hparams), _run_soap(lambda gs: NaiveSOAP(gs), hparams)
    moved = min((x - s.detach()).abs().max().item() for x, s in zip(b, _soap_params()))
    assert moved > 1e-6, f"{case}: the reference did not move the parameters"
    dev = parity.max_rel_deviation(a, b)
    parity.RESULTS.append((case, "naive loop of the reference soap.py", dev))
    assert dev <= tol, f"{case}: max relative deviation {dev:.3e} > {tol:.0e}"
    return dev


@pytest.mark.parametrize("foreach", [True, False])
def test_soap_equals_reference_loop(foreach: bool) -> None:
    _assert_soap_parity(f"soap (foreach={foreach})", lambda gs: distopt.create("soap", gs, foreach=foreach),
                        SOAP_GROUPS)


def test_soap_defaults_and_frequency_one() -> None:
    groups = [dict(precondition_frequency=1), dict(lr=0.01, shampoo_beta=0.5, weight_decay=0.1, betas=(0.9, 0.9))]
    _assert_soap_parity("soap defaults / freq 1", lambda gs: distopt.create("soap", gs), groups)


def test_soap_only_vectors_is_adam_after_one_skipped_step() -> None:
    """Without precondition_1d a vector never gets a basis: SOAP is Adam with the reference's eps
    placement, weight decay after the step, and the first step skipped."""
    g = torch.Generator().manual_seed(5)
    start = torch.randn(9, generator=g, dtype=torch.float64)
    target = torch.randn(9, generator=g, dtype=torch.float64)
    p = start.clone().requires_grad_()
    opt = distopt.create("soap", [p], lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    q, m, v = start.clone(), torch.zeros(9, dtype=torch.float64), torch.zeros(9, dtype=torch.float64)
    for t in range(60):
        opt.zero_grad()
        ((p - target) ** 4).sum().backward()
        opt.step()
        grad = 4 * (q - target) ** 3
        if t == 0:
            continue
        m = 0.9 * m + 0.1 * grad
        v = 0.99 * v + 0.01 * grad**2
        q = q - 0.05 * math.sqrt(1 - 0.99**t) / (1 - 0.9**t) * m / (v.sqrt() + 1e-8)
        q = q * (1 - 0.05 * 0.1)
    assert parity.max_rel_deviation([p.detach()], [q]) < 1e-12


def test_soap_bases_stay_orthogonal_and_state_is_float32_for_bfloat16() -> None:
    w = torch.randn(6, 4).to(torch.bfloat16).requires_grad_()
    opt = distopt.create("soap", [w], lr=0.01, precondition_frequency=2)
    for _ in range(7):
        opt.zero_grad()
        (w.float() ** 2).sum().backward()
        opt.step()
    st = opt.state[w]
    assert w.dtype == torch.bfloat16 and torch.isfinite(w.float()).all()
    for d in (0, 1):
        q = st[f"Q_{d}"]
        assert q.dtype == torch.float32
        assert torch.allclose(q.T @ q, torch.eye(q.shape[0]), atol=1e-5)
    fresh = distopt.create("soap", [w], lr=0.01)
    fresh.load_state_dict(opt.state_dict())
    assert all(fresh.state[w][k].dtype == v.dtype for k, v in st.items())


def test_soap_declares_matrix_locality() -> None:
    cls = distopt.get("soap")
    recipe = cls.recipe({k: h.default for k, h in cls.hyperparameters().items()})
    assert recipe.locality == distopt.Locality.MATRIX


def test_soap_skipped_dimensions_equal_reference_loop() -> None:
    """Dimensions above max_precond_dim stay in the standard basis, first or last."""
    def run(factory: Any) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(7)
        params = [torch.randn(3, 4, 12, generator=g, dtype=torch.float64, requires_grad=True),
                  torch.randn(12, 3, generator=g, dtype=torch.float64, requires_grad=True)]
        opt = factory(params)
        for _ in range(40):
            z = torch.randn(3, 4, 12, generator=g, dtype=torch.float64)
            opt.zero_grad()
            ((torch.sin(params[0]) * z).sum() ** 2 + (torch.tanh(params[1]) * z.reshape(-1)[:36].reshape(12, 3)).sum() ** 2).backward()
            opt.step()
        return [p.detach() for p in params]

    hp = dict(lr=0.01, max_precond_dim=10, precondition_frequency=4)
    dev = parity.max_rel_deviation(run(lambda ps: distopt.create("soap", ps, **hp)), run(lambda ps: NaiveSOAP(ps, **hp)))
    assert dev < 1e-10


def test_bench_second_order_rows() -> None:
    from distopt.bench.second_order_step import bench_second_order, gpt_shapes

    shapes = gpt_shapes(scale=16 / 768, layers=1)
    assert shapes[2] == (48, 16) and len(shapes) == 14
    rows = bench_second_order(["shampoo", "soap", "muon"], shapes, repeats=1, precondition_frequency=1,
                              clock="process")
    assert [(r["optimizer"], r["impl"]) for r in rows] == [
        ("adamw", "distopt"), ("shampoo", "distopt"), ("soap", "distopt"), ("muon", "distopt"),
        ("muon", "torch.optim.Muon")]
    assert all(r["error"] is None and r["ms_per_step"] > 0 for r in rows)
    assert rows[0]["ratio_vs_adamw"] == 1.0
