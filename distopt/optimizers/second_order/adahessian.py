"""AdaHessian (Yao, Gholami, Shen, Mustafa, Keutzer & Mahoney, "ADAHESSIAN: An Adaptive Second
Order Optimizer for Machine Learning", AAAI 2021): Adam with the gradient's square replaced by
the square of a Hutchinson estimate of the Hessian diagonal.

    D_t = z ⊙ (H z),  z Rademacher   (refreshed every ``update_each`` steps, kept in between)
    D_t <- mean over the kernel's spatial dims of |D_t|   (conv kernels, ``average_conv_kernel``)
    m_t = β1 m + (1-β1) g;   v_t = β2 v + (1-β2) D_t²
    p <- p (1 - lr·wd) - lr · (m_t/(1-β1^t)) / ((v_t/(1-β2^t))^(k/2) + ε)

k is ``hessian_power``; ``eps`` must be > 0 (exactly zero Hessian-diagonal entries are common:
parameters entering the loss linearly); weight decay is decoupled (AdamW style, as the reference code). The
hyperparameter names and ``update_each`` / ``n_samples`` / ``average_conv_kernel`` follow the
widely used davda54/ada-hessian implementation (defaults lr=0.1, eps=1e-8), whose v-EMA runs
every step with the stored D, also between refreshes.

**Gradients must carry a graph**: call ``loss.backward(create_graph=True)`` before ``step()``
or pass a closure that does (``closure_kind = "create_graph"``); without it ``step`` raises a
RuntimeError naming the fix. Probes are drawn from ``torch.Generator`` seeded by ``seed``
(see distopt/estimators/hutchinson.py for the exact rule), one HVP per param group.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.hessian_moment import HessianSquareMoment
from distopt.accumulators.moments import FirstMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, Rule, _real, betas, gt, integer
from distopt.estimators.hutchinson import HutchinsonDiagonal
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.hessian_diagonal import HessianPowerPreconditioner


@register
class AdaHessian(DistOptimizer):
    __doc__ = __doc__
    name = "adahessian"
    family = "second_order"
    keep_state_dtypes = True
    reference = "naive float64 loop of the paper's update (tests/reference/test_curvature.py)"
    closure_kind = "create_graph"
    hyper = {
        "lr": Hyper(0.1, LR.rule),
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": Hyper(1e-8, gt(0.0)),  # > 0: a zero Hessian diagonal entry is common
        "weight_decay": WEIGHT_DECAY,
        "hessian_power": Hyper(1.0, Rule(lambda x: _real(x) and 0.0 < x <= 1.0, "in (0.0, 1.0]")),
        "update_each": Hyper(1, integer(1)),
        "n_samples": Hyper(1, integer(1)),
        "average_conv_kernel": Hyper(True, FLAG),
        "seed": Hyper(0, integer(0)),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            HutchinsonDiagonal(group["seed"], group["update_each"], group["n_samples"], "rademacher",
                               average_conv_kernel=group["average_conv_kernel"], owner=cls.name),
            FirstMoment(b1),
            HessianSquareMoment(b2),
            HessianPowerPreconditioner(group["eps"], b1, b2, group["hessian_power"]),
            DecoupledWeightDecay(group["weight_decay"]),
            ApplyLR(),
        )
