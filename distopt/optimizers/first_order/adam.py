"""Adam (Kingma & Ba, ICLR 2015) and AdamW (Loshchilov & Hutter, ICLR 2019), as torch.optim.

    Adam:  g <- g + wd·p (coupled);   AdamW: p <- p (1 - lr·wd) (decoupled)
    m <- β1 m + (1-β1) g;  v <- β2 v + (1-β2) g²;  v̂ = max(v̂, v) with amsgrad
    p <- p - lr · (m / (1-β1^t)) / (sqrt(v̂ / (1-β2^t)) + ε)

The chain is the definition; ``foreach`` (default) and ``fused=True`` run torch's own
multi-tensor / fused kernels on the same state (``torch_adam_route``), which the tests keep
equal to the chain. ``foreach=False`` runs the chain one tensor at a time.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor
from torch.optim.adam import adam as torch_adam_kernel

from distopt.accumulators import FirstMoment, SecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, LR, OPTIONAL_FLAG, WEIGHT_DECAY, betas
from distopt.core.shell import Route
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay, RootMomentPreconditioner
from distopt.scenarios import AddWeightDecay

ADAM_HYPER = {
    "lr": LR,
    "betas": Hyper((0.9, 0.999), betas(2)),
    "eps": EPS,
    "weight_decay": WEIGHT_DECAY,
    "amsgrad": Hyper(False, FLAG),
    "fused": Hyper(None, OPTIONAL_FLAG),
}


def torch_adam_route(decoupled: bool) -> Route:
    """Fast route: torch's own foreach (or, with ``fused=True``, fused) Adam kernel on the
    recipe's state buffers, which use torch's layout (``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, ``step``). Same math as :func:`adam_moments` + apply; tested equal."""

    def run(group: Mapping[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict]) -> None:
        b1, b2 = group["betas"]
        fused = bool(group["fused"])
        torch_adam_kernel(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], [s["step"] for s in states],
            foreach=not fused, fused=fused or None, decoupled_weight_decay=decoupled, amsgrad=group["amsgrad"],
            beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"],
        )

    return run


def adam_moments(group: Mapping[str, Any]) -> Chain:
    """The Φ and diagonal-P part shared by the Adam family."""
    b1, b2 = group["betas"]
    key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    return chain(
        SecondMoment(b2, amsgrad=bool(group.get("amsgrad"))),
        FirstMoment(b1),
        RootMomentPreconditioner(group["eps"], b1, b2, key=key),
    )


@register
class Adam(DistOptimizer):
    name = "adam"
    family = "first_order"
    reference = "torch.optim.Adam"
    hyper = ADAM_HYPER

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(AddWeightDecay(group["weight_decay"]), adam_moments(group), ApplyLR(group["lr"]))

    @classmethod
    def fast_route(cls, group: Mapping[str, Any]) -> Route:
        return torch_adam_route(decoupled=False)


@register
class AdamW(DistOptimizer):
    name = "adamw"
    family = "first_order"
    reference = "torch.optim.AdamW"
    hyper = {**ADAM_HYPER, "weight_decay": Hyper(1e-2, WEIGHT_DECAY.rule)}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(adam_moments(group), DecoupledWeightDecay(group["weight_decay"], group["lr"]), ApplyLR(group["lr"]))

    @classmethod
    def fast_route(cls, group: Mapping[str, Any]) -> Route:
        return torch_adam_route(decoupled=True)
