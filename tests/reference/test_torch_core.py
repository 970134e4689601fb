"""SGD, Adam and AdamW against torch.optim, float64, 100 steps, two param groups."""
from __future__ import annotations

import pytest
import torch

import distopt
from parity import assert_parity

CASES = {
    "sgd-momentum-dampening": ("sgd", torch.optim.SGD, [
        dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2),
        dict(lr=0.02, momentum=0.5, weight_decay=5e-2)]),
    "sgd-nesterov": ("sgd", torch.optim.SGD, [
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(lr=0.1, momentum=0.0, weight_decay=0.0)]),
    "adam": ("adam", torch.optim.Adam, [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=1e-2), dict(lr=3e-3, eps=1e-6, weight_decay=0.1)]),
    "adam-amsgrad": ("adam", torch.optim.Adam, [
        dict(lr=1e-2, amsgrad=True, weight_decay=1e-2), dict(lr=3e-3, amsgrad=True, betas=(0.8, 0.9))]),
    "adamw": ("adamw", torch.optim.AdamW, [
        dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.3)]),
    "adamw-amsgrad-maximize": ("adamw", torch.optim.AdamW, [
        dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True), dict(lr=3e-3, amsgrad=True, maximize=True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("foreach", [True, False])
def test_parity_with_torch(case: str, foreach: bool) -> None:
    name, ref_cls, hparams = CASES[case]
    assert_parity(
        f"{case} (foreach={foreach})",
        lambda groups: distopt.create(name, groups, foreach=foreach),
        lambda groups: ref_cls(groups),
        hparams,
        reference=f"torch.optim.{ref_cls.__name__}",
    )


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("route", [{"fused": True}, {"foreach": True}])
def test_fast_routes_equal_the_chain(name: str, route: dict) -> None:
    """The torch-kernel routes (foreach, fused on CPU) against distopt's own chain (foreach=False)."""
    hparams = [dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(lr=3e-3, betas=(0.8, 0.9), weight_decay=0.0)]
    assert_parity(
        f"{name} route {route} vs chain",
        lambda groups: distopt.create(name, groups, **route),
        lambda groups: distopt.create(name, groups, foreach=False),
        hparams,
        reference=f"distopt {name} chain (foreach=False)",
    )
