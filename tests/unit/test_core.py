"""The operator core: stage-order check, user chains, registry and hyperparameter errors."""
from __future__ import annotations

import pytest
import torch

import distopt
from distopt.accumulators import FirstMoment, HeavyBall, SecondMoment
from distopt.core import Locality, Stage
from distopt.core.tensor_ops import TensorOps
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay, RootMomentPreconditioner
from distopt.scenarios import AddWeightDecay


def test_chain_rejects_stages_out_of_order() -> None:
    with pytest.raises(ValueError, match="AddWeightDecay \\(stage T\\) cannot follow HeavyBall \\(stage Φ\\)"):
        distopt.chain(HeavyBall(0.9), AddWeightDecay(0.1))
    with pytest.raises(TypeError, match="Operator"):
        distopt.chain(HeavyBall(0.9), "adam")


def test_chain_flattens_and_reports_stages_and_locality() -> None:
    inner = distopt.chain(SecondMoment(0.999), FirstMoment(0.9))
    recipe = distopt.chain(AddWeightDecay(0.1), inner, RootMomentPreconditioner(1e-8, 0.9, 0.999), ApplyLR())
    assert len(recipe) == 5 and recipe.stages == "TΦP" and recipe.locality is Locality.ELEMENTWISE
    assert [op.stage for op in recipe][-1] is Stage.P


def test_chain_rejects_clashing_state_keys() -> None:
    recipe = distopt.chain(FirstMoment(0.9), FirstMoment(0.5), ApplyLR())
    with pytest.raises(ValueError, match="exp_avg"):
        recipe.init(torch.zeros(3))


def test_user_chain_equals_adamw_and_follows_scheduler() -> None:
    def adamw_chain(group):
        return distopt.chain(
            SecondMoment(0.999), FirstMoment(0.9), RootMomentPreconditioner(1e-8, 0.9, 0.999),
            DecoupledWeightDecay(group["weight_decay"]), ApplyLR(),
        )

    torch.manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    ours = distopt.ChainOptimizer([a], adamw_chain, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (ours, ref)]
    for _ in range(10):
        for p, o, s in zip((a, b), (ours, ref), scheds):
            o.zero_grad()
            (p.sin() ** 2).sum().backward()
            o.step()
            s.step()
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_validation_messages_name_argument_and_range() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"adamw: invalid lr=-0.1; lr must be >= 0.0"):
        distopt.AdamW(p, lr=-0.1)
    with pytest.raises(ValueError, match=r"betas must be a tuple of 2 floats, each in \[0, 1\)"):
        distopt.create("adam", p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum must be in"):
        distopt.create("sgd", p, momentum=1.5)
    with pytest.raises(ValueError, match="nesterov=True requires momentum > 0"):
        distopt.create("sgd", p, nesterov=True)
    with pytest.raises(TypeError, match="unknown hyperparameter 'beta1'; allowed: amsgrad, betas"):
        distopt.create("adam", p, beta1=0.9)
    opt = distopt.create("sgd", p, lr=0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "weight_decay": -1.0})
    with pytest.raises(TypeError, match="string"):
        distopt.create(None, p)  # type: ignore[arg-type]


def test_create_is_case_insensitive_and_returns_torch_optimizer() -> None:
    opt = distopt.create("AdamW", [torch.zeros(2, requires_grad=True)])
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, distopt.AdamW)
    assert opt.defaults["weight_decay"] == 1e-2 and opt.defaults["betas"] == (0.9, 0.999)


def test_sparse_gradients_are_refused() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        distopt.create("adam", emb.parameters()).step()


@pytest.mark.parametrize("name", ["lerp_", "addcmul_", "sqrt", "maximum_", "norm", "add"])
def test_tensor_ops_routes_agree(name: str) -> None:
    torch.manual_seed(0)
    xs = [torch.rand(3, 2), torch.rand(5)]
    args = {"lerp_": ([torch.rand(3, 2), torch.rand(5)], 0.3), "addcmul_": ([torch.rand(3, 2), torch.rand(5)],
            [torch.rand(3, 2), torch.rand(5)]), "sqrt": (), "maximum_": ([torch.rand(3, 2), torch.rand(5)],),
            "norm": (), "add": ([torch.rand(3, 2), torch.rand(5)],)}[name]
    out = [getattr(TensorOps(f), name)([x.clone() for x in xs], *args) for f in (True, False)]
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("name", "hparams", "expected"), [
    ("sgd", {}, 0),                                   # no momentum: no buffer
    ("sgd", {"momentum": 0.9}, 4 * (64 * 48 + 48)),   # one fp32 buffer per param
    ("adamw", {}, 8 * (64 * 48 + 48)),                # exp_avg + exp_avg_sq
    ("adamw", {"amsgrad": True}, 12 * (64 * 48 + 48)),
    ("adafactor", {}, 4 * (64 + 48) + 4 * 48),        # row + column factors; a vector keeps a full one
])
def test_state_bytes_counts_every_state_tensor(name: str, hparams: dict, expected: int) -> None:
    params = [torch.nn.Parameter(torch.randn(64, 48)), torch.nn.Parameter(torch.randn(48))]
    opt = distopt.create(name, params, **hparams)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert distopt.state_bytes(opt) == expected
    steps = sum(s["step"].nbytes for s in opt.state.values())
    assert distopt.state_bytes(opt, include_step=True) == expected + steps
    assert distopt.state_bytes_per_param(opt) == pytest.approx(expected / (64 * 48 + 48))
