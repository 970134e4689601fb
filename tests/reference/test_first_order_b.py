"""MADGRAD, MARS, Adan, ADOPT, Lookahead and Schedule-Free AdamW/SGD against independent
references (pytorch_optimizer 4.1, schedulefree 1.4) and naive per-tensor loops of the papers,
float64, 100 steps, two param groups with different hyperparameters, foreach on and off."""
from __future__ import annotations

import math
from typing import Any

import pytest
import pytorch_optimizer as po
import schedulefree
import torch

import distopt
from parity import assert_parity, groups_of, make_params, run

FOREACH = pytest.mark.parametrize("foreach", [True, False])


def ours(name: str, foreach: bool, **kwargs: Any):
    return lambda groups: distopt.create(name, groups, foreach=foreach, **kwargs)


# ----------------------------------------------------------------------------- MADGRAD
# The paper (Alg. 1) weights step t by λ_t = lr·sqrt(t). The authors' code and pytorch_optimizer
# use (lr + eps)·sqrt(t); distopt follows the paper, so the reference gets lr - eps.
MADGRAD_GROUPS = [dict(lr=1e-2, momentum=0.9, eps=1e-6, weight_decay=1e-2), dict(lr=5e-3, momentum=0.0, eps=1e-5)]


@FOREACH
def test_madgrad(foreach: bool) -> None:
    ref_groups = [{**g, "lr": g["lr"] - g["eps"]} for g in MADGRAD_GROUPS]
    assert_parity(
        f"madgrad (foreach={foreach})", ours("madgrad", foreach), lambda groups: po.MADGRAD(groups),
        MADGRAD_GROUPS, reference="pytorch_optimizer.MADGRAD (lr - eps)", ref_group_hparams=ref_groups,
    )


# ----------------------------------------------------------------------------- MARS
class NaiveMARS(torch.optim.Optimizer):
    """MARS-AdamW, approximate variant (Yuan et al. 2024, Alg. 2; authors' code AGI-Arena/MARS
    with optimize_1d=True): g_0 = 0, c = g + γβ1/(1-β1)(g - g_prev), c /= ||c|| if ||c|| > 1,
    Adam moments on c, eps outside the bias correction, p <- p - lr (wd p + m̂/(sqrt(v̂)+eps))."""

    def __init__(self, params: Any, lr=3e-3, betas=(0.95, 0.99), gamma=0.025, eps=1e-8, weight_decay=0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, gamma=gamma, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), last=torch.zeros_like(p))
                st["t"] += 1
                t, g = st["t"], p.grad
                c = g + group["gamma"] * b1 / (1 - b1) * (g - st["last"])
                norm = torch.norm(c)
                if norm > 1:
                    c = c / norm
                st["m"] = b1 * st["m"] + (1 - b1) * c
                st["v"] = b2 * st["v"] + (1 - b2) * c * c
                m_hat, v_hat = st["m"] / (1 - b1**t), st["v"] / (1 - b2**t)
                p -= group["lr"] * (group["weight_decay"] * p + m_hat / (v_hat.sqrt() + group["eps"]))
                st["last"] = g.clone()


MARS_GROUPS = [dict(lr=3e-3, betas=(0.95, 0.99), gamma=0.025, weight_decay=0.1),
               dict(lr=1e-2, betas=(0.9, 0.95), gamma=0.1, eps=1e-6)]


@FOREACH
def test_mars_naive(foreach: bool) -> None:
    assert_parity(f"mars (foreach={foreach})", ours("mars", foreach), lambda groups: NaiveMARS(groups),
                  MARS_GROUPS, reference="naive MARS-AdamW loop")


@FOREACH
def test_mars_pytorch_optimizer(foreach: bool) -> None:
    # pytorch_optimizer.MARS divides (sqrt(v + 1e-15) + eps) by sqrt(1 - β2^t): eps inside the
    # bias correction and 1e-15 under the root, unlike the authors' code. With eps = 0 the only
    # difference left is the 1e-15, far below the tolerance here.
    groups = [{**g, "eps": 0.0} for g in MARS_GROUPS]
    assert_parity(
        f"mars eps=0 (foreach={foreach})", ours("mars", foreach),
        lambda gs: po.MARS(gs, mars_type="adamw", optimize_1d=True, weight_decouple=True),
        groups, reference="pytorch_optimizer.MARS (eps=0)",
    )


# ----------------------------------------------------------------------------- Adan
ADAN_GROUPS = [dict(lr=1e-2, betas=(0.98, 0.92, 0.99), weight_decay=0.05),
               dict(lr=3e-3, betas=(0.9, 0.8, 0.999), eps=1e-6, weight_decay=0.0)]


@FOREACH
def test_adan(foreach: bool) -> None:
    # weight_decouple=False is pytorch_optimizer's (and the authors' default) proximal decay
    # p <- (p - lr·u) / (1 + lr·wd), the paper's rule.
    assert_parity(f"adan (foreach={foreach})", ours("adan", foreach),
                  lambda groups: po.Adan(groups, weight_decouple=False), ADAN_GROUPS,
                  reference="pytorch_optimizer.Adan")


# ----------------------------------------------------------------------------- ADOPT
class NaiveADOPT(torch.optim.Optimizer):
    """ADOPT (Taniguchi et al. 2024, Alg. 2) as the authors' code: the first call sets v = g²;
    then m <- β1 m + (1-β1) clip(g / max(sqrt v, eps), s^e) with s the number of earlier calls,
    p <- p (1 - lr wd) (decoupled) - lr m, v <- β2 v + (1-β2) g²."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.9999), eps=1e-6, weight_decay=0.0,
                 decouple=False, clip_exponent=0.25) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decouple=decouple,
                                      clip_exponent=clip_exponent))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(s=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                g = p.grad if group["decouple"] else p.grad + wd * p
                if st["s"] == 0:
                    st["v"] = g * g
                else:
                    if group["decouple"]:
                        p *= 1 - lr * wd
                    n = g / torch.clamp(st["v"].sqrt(), min=group["eps"])
                    if group["clip_exponent"] is not None:
                        bound = st["s"] ** group["clip_exponent"]
                        n = n.clamp(-bound, bound)
                    st["m"] = b1 * st["m"] + (1 - b1) * n
                    p -= lr * st["m"]
                    st["v"] = b2 * st["v"] + (1 - b2) * g * g
                st["s"] += 1


ADOPT_GROUPS = [dict(lr=1e-2, betas=(0.9, 0.9999), weight_decay=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-5)]


@FOREACH
@pytest.mark.parametrize("clip", [True, False])
def test_adopt_pytorch_optimizer(foreach: bool, clip: bool) -> None:
    # pytorch_optimizer calls clip_lambda with the already incremented step (2 on the first real
    # update); the paper and the authors' code use the number of earlier calls (1). Shifting the
    # reference's clip_lambda by one makes them agree.
    groups = [{**g, "clip_exponent": 0.25 if clip else None} for g in ADOPT_GROUPS]
    clip_lambda = (lambda step: (step - 1) ** 0.25) if clip else None
    assert_parity(f"adopt clip={clip} (foreach={foreach})", ours("adopt", foreach),
                  lambda gs: po.ADOPT(gs, clip_lambda=clip_lambda), groups,
                  reference="pytorch_optimizer.ADOPT (clip shifted)",
                  ref_group_hparams=[{k: v for k, v in g.items() if k != "clip_exponent"} for g in groups])


@FOREACH
def test_adopt_decoupled_naive(foreach: bool) -> None:
    # pytorch_optimizer also decays the weights on the first call (which only initialises v);
    # the authors' code starts decaying with the first real update, as distopt does.
    groups = [dict(lr=1e-2, weight_decay=0.1, decouple=True, clip_exponent=0.5),
              dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.02, decouple=True, clip_exponent=None)]
    assert_parity(f"adopt decoupled (foreach={foreach})", ours("adopt", foreach), lambda gs: NaiveADOPT(gs),
                  groups, reference="naive ADOPT loop")


# ----------------------------------------------------------------------------- Lookahead
LOOKAHEAD_CASES = {
    "adamw": (torch.optim.AdamW, [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95))]),
    "sgd": (torch.optim.SGD, [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
                              dict(lr=0.1, momentum=0.5, dampening=0.1)]),
}


@FOREACH
@pytest.mark.parametrize("base", sorted(LOOKAHEAD_CASES))
@pytest.mark.parametrize("k,alpha", [(5, 0.5), (3, 0.8)])
def test_lookahead(foreach: bool, base: str, k: int, alpha: float) -> None:
    ref_cls, groups = LOOKAHEAD_CASES[base]
    assert_parity(
        f"lookahead[{base}] k={k} alpha={alpha} (foreach={foreach})",
        ours("lookahead", foreach, base=base, k=k, alpha=alpha),
        lambda gs: po.Lookahead(ref_cls(gs), k=k, alpha=alpha), groups,
        reference=f"pytorch_optimizer.Lookahead(torch.optim.{ref_cls.__name__})",
    )


def test_lookahead_validates_base() -> None:
    params = make_params()
    for bad, match in [("lookahead", "another registered"), ("nope", "must be one of"), (3, "name of a registered"),
                       ("schedule_free_sgd", "own step")]:
        with pytest.raises(ValueError, match=match):
            distopt.create("lookahead", params, base=bad)
    with pytest.raises(ValueError, match="alpha"):
        distopt.create("lookahead", params, base="sgd", alpha=1.5)
    with pytest.raises(ValueError, match="k"):
        distopt.create("lookahead", params, base="sgd", k=0)
    with pytest.raises(TypeError, match="betas"):
        distopt.create("lookahead", params, base="sgd", betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="nesterov"):  # the base's own constructor checks run too
        distopt.create("lookahead", params, base="sgd", nesterov=True)
    opt = distopt.create("lookahead", params, base="adam", lr=0.1)
    assert "betas" in opt.hyperparameters() and opt.defaults["base"] == "adam"


# ----------------------------------------------------------------------------- Schedule-Free
def _train(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    opt.train()  # the reference optimizers start in eval mode
    return opt


def _eval_at_end(opt: Any, t: int) -> None:
    if t == 99:
        opt.eval()


SF_CASES = {
    "schedule_free_adamw": (schedulefree.AdamWScheduleFreeReference, [
        dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.05, warmup_steps=10, r=0.5, weight_lr_power=2.0),
        dict(lr=5e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, decay_at_z=True, r=0.0, weight_lr_power=1.0)]),
    "schedule_free_sgd": (schedulefree.SGDScheduleFreeReference, [
        dict(lr=0.05, momentum=0.9, weight_decay=1e-2, warmup_steps=20, r=1.0),
        dict(lr=0.1, momentum=0.7, weight_lr_power=0.0)]),
}


@FOREACH
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(SF_CASES))
def test_schedule_free(foreach: bool, mode: str, name: str) -> None:
    ref_cls, groups = SF_CASES[name]
    assert_parity(
        f"{name} {mode} params (foreach={foreach})", ours(name, foreach), lambda gs: _train(ref_cls(gs)), groups,
        reference=f"schedulefree.{ref_cls.__name__}", after_step=_eval_at_end if mode == "eval" else None,
    )


@pytest.mark.parametrize("name", sorted(SF_CASES))
def test_schedule_free_train_eval_round_trip(name: str) -> None:
    _, groups = SF_CASES[name]
    holder: list[Any] = []
    y = run(lambda gs: holder.append(distopt.create(name, gs)) or holder[-1], groups, steps=20)
    opt = holder[-1]
    params = [p for g in opt.param_groups for p in g["params"]]
    opt.eval()
    x = [p.detach().clone() for p in params]
    assert all(torch.equal(p, opt.state[p]["x"]) for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(x, y))
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.eval()  # idempotent
    opt.train()
    assert all(torch.equal(p, b) for p, b in zip(params, y))
    opt.train()  # idempotent
    assert all(torch.equal(p, b) for p, b in zip(params, y))
    # the mode survives a state_dict round trip
    opt.eval()
    fresh = distopt.create(name, groups_of([p.detach().clone() for p in params], groups))
    fresh.load_state_dict(opt.state_dict())
    assert all(not g["train_mode"] for g in fresh.param_groups)


# ----------------------------------------------------------------------------- sanity
@pytest.mark.parametrize("name", ["madgrad", "mars", "adan", "adopt", "lookahead", "schedule_free_adamw",
                                  "schedule_free_sgd"])
def test_least_squares_converges(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 5, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    solution = torch.linalg.lstsq(a, b.unsqueeze(1)).solution.squeeze(1)
    best = ((a @ solution - b) ** 2).sum().item()
    lr = {"madgrad": 1e-2, "schedule_free_sgd": 5e-3, "lookahead": 5e-2}.get(name, 3e-2)
    opt = distopt.create(name, [x], lr=lr)
    start = ((a @ x - b) ** 2).sum().item()
    for _ in range(1000):
        opt.zero_grad()
        loss = ((a @ x - b) ** 2).sum()
        loss.backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()
    final = ((a @ x - b) ** 2).sum().item()
    assert final - best < 1e-2 * (start - best), (name, start, final, best)


def test_metadata() -> None:
    mars = distopt.get("mars")
    assert mars.recipe({k: h.default for k, h in mars.hyperparameters().items()}).locality == distopt.Locality.TENSOR
    for name in ["madgrad", "adan", "adopt", "schedule_free_adamw", "schedule_free_sgd"]:
        cls = distopt.get(name)
        recipe = cls.recipe({k: h.default for k, h in cls.hyperparameters().items()})
        assert recipe.locality == distopt.Locality.ELEMENTWISE
    assert math.isclose(distopt.get("madgrad").hyperparameters()["lr"].default, 1e-2)
