"""Adagrad, RMSprop, Adamax, NAdam, NAdamW, RAdam and Adafactor against torch.optim, float64,
100 steps, two param groups with different hyperparameters (each group holds a 2-D weight and
a 1-D bias, so Adafactor's factored and unfactored paths both run). The torch reference runs
with the same ``foreach`` setting, so both of torch's implementations are compared too."""
from __future__ import annotations

import pytest
import torch

import distopt
from parity import assert_parity

CASES = {
    "adagrad": ("adagrad", torch.optim.Adagrad, {}, [
        dict(lr=0.05, weight_decay=1e-2), dict(lr=0.02, eps=1e-6, weight_decay=0.1)]),
    # torch.optim.Adagrad fills state["sum"] in __init__ from the *constructor's*
    # initial_accumulator_value and ignores a per-group value; distopt honours the group's value
    # (see test_adagrad_initial_accumulator_per_group), so the reference gets it as a constructor
    # argument and both groups use the same value here.
    "adagrad-lr_decay-initial_acc": ("adagrad", torch.optim.Adagrad, {"initial_accumulator_value": 0.1}, [
        dict(lr=0.05, lr_decay=0.01, initial_accumulator_value=0.1, weight_decay=1e-2),
        dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1, eps=1e-8)]),
    "rmsprop": ("rmsprop", torch.optim.RMSprop, {}, [
        dict(lr=1e-2, weight_decay=1e-2), dict(lr=3e-3, alpha=0.9, eps=1e-6)]),
    "rmsprop-centered-momentum": ("rmsprop", torch.optim.RMSprop, {}, [
        dict(lr=1e-2, alpha=0.95, momentum=0.9, centered=True, weight_decay=1e-2),
        dict(lr=3e-3, momentum=0.5, centered=False, weight_decay=0.1)]),
    "rmsprop-centered-maximize": ("rmsprop", torch.optim.RMSprop, {}, [
        dict(lr=1e-2, centered=True, maximize=True, weight_decay=0.0),
        dict(lr=3e-3, centered=True, momentum=0.8, maximize=True, weight_decay=5e-2)]),
    "adamax": ("adamax", torch.optim.Adamax, {}, [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6)]),
    "nadam": ("nadam", torch.optim.NAdam, {}, [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2),
        dict(lr=3e-3, momentum_decay=1e-2, eps=1e-6, weight_decay=0.1)]),
    "nadam-decoupled": ("nadam", torch.optim.NAdam, {}, [
        dict(lr=1e-2, decoupled_weight_decay=True, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.8, 0.95), momentum_decay=2e-2, decoupled_weight_decay=False, weight_decay=1e-2)]),
    "nadamw": ("nadamw", torch.optim.NAdam, {"decoupled_weight_decay": True}, [
        dict(lr=1e-2, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.8, 0.95), momentum_decay=1e-3, weight_decay=1e-2, maximize=True)]),
    "radam": ("radam", torch.optim.RAdam, {}, [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), dict(lr=3e-3, eps=1e-6, weight_decay=0.1)]),
    "radam-decoupled": ("radam", torch.optim.RAdam, {}, [
        dict(lr=1e-2, betas=(0.9, 0.99), decoupled_weight_decay=True, weight_decay=0.1),
        dict(lr=3e-3, betas=(0.8, 0.9), decoupled_weight_decay=False, weight_decay=1e-2, maximize=True)]),
    "adafactor": ("adafactor", torch.optim.Adafactor, {}, [
        dict(lr=1e-2, weight_decay=1e-2), dict(lr=0.3, beta2_decay=-0.5, eps=(1e-30, 1e-2), weight_decay=0.1)]),
    "adafactor-clip-maximize": ("adafactor", torch.optim.Adafactor, {}, [
        dict(lr=0.05, d=1.5, weight_decay=0.05, maximize=True), dict(lr=2e-2, eps=(None, 1e-4), maximize=True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("foreach", [True, False])
def test_parity_with_torch(case: str, foreach: bool) -> None:
    name, ref_cls, ref_kwargs, hparams = CASES[case]
    reference = distopt.get(name).reference
    assert reference.startswith(f"torch.optim.{ref_cls.__name__}")
    assert_parity(
        f"{case} (foreach={foreach})",
        lambda groups: distopt.create(name, groups, foreach=foreach),
        lambda groups: ref_cls(groups, foreach=foreach, **ref_kwargs),
        hparams,
        reference=reference,
    )


def test_adafactor_state_is_factored() -> None:
    """2-D parameters keep only row/column factors (O(n + m) memory), 1-D ones a full EMA."""
    w = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    opt = distopt.create("adafactor", [w, b])
    ((w.sum(1) * b) ** 2).sum().backward()
    opt.step()
    assert opt.state[w]["row_var"].shape == (8, 1) and opt.state[w]["col_var"].shape == (1, 6)
    assert "variance" not in opt.state[w] and opt.state[b]["variance"].shape == (8,)
    assert distopt.get("adafactor").recipe(opt.param_groups[0]).locality == distopt.Locality.TENSOR


def test_adagrad_initial_accumulator_per_group() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = distopt.create("adagrad", [{"params": [a], "initial_accumulator_value": 0.5}, {"params": [b]}], eps=0.0)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert torch.allclose(opt.state[a]["sum"], torch.full((3,), 1.5))
    assert torch.allclose(opt.state[b]["sum"], torch.ones(2))
    assert torch.allclose(a.detach(), torch.full((3,), -1e-2 / 1.5**0.5))


def test_nadamw_defaults_and_no_decoupled_flag() -> None:
    assert distopt.get("nadamw").hyperparameters()["weight_decay"].default == 1e-2
    with pytest.raises(TypeError, match="decoupled_weight_decay"):
        distopt.create("nadamw", [torch.zeros(2, requires_grad=True)], decoupled_weight_decay=False)


@pytest.mark.parametrize(("name", "bad"), [
    ("adagrad", dict(lr_decay=-1.0)), ("adagrad", dict(initial_accumulator_value=-0.1)),
    ("rmsprop", dict(alpha=-0.1)), ("rmsprop", dict(momentum=-0.5)), ("nadam", dict(momentum_decay=-1.0)),
    ("adafactor", dict(beta2_decay=0.5)), ("adafactor", dict(d=0.5)), ("adafactor", dict(eps=(-1.0, 1e-3))),
    ("adafactor", dict(eps=(None, -1e-3))), ("adamax", dict(eps=-1.0)), ("radam", dict(betas=(0.9, 1.0))),
])
def test_invalid_hyperparameters(name: str, bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        distopt.create(name, [torch.zeros(2, requires_grad=True)], **bad)
