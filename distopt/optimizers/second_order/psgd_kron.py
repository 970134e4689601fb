"""PSGD Kron (Xi-Lin Li, "Preconditioned Stochastic Gradient Descent", IEEE TNNLS 2018, with the
Kronecker-factored preconditioner of "Black Box Lie Group Preconditioners for SGD", 2022), as the
``kron`` optimizer of psgd_jax / kron_torch / timm ``Kron``:

    m <- β1 m + (1 - β1) g;            G = m / (1 - β1^t)
    with probability p_t: fit Q_1..Q_n on (G, V ~ N(0, I))   (precond_lr; see psgd_kron.py)
    u = G ×_1 Q_1ᵀQ_1 ... ×_n Q_nᵀQ_n;  u <- u · min(1, 1.1 / (rms(u) + 1e-6))
    p <- p (1 - lr·wd) - lr·u

One factor per dimension: triangular, or diagonal for dims of size 1 or above
``max_size_triangular`` and for tensors with fewer than ``min_ndim_triangular`` dims (biases).
``preconditioner_update_probability=None`` is kron's schedule (1 for 500 steps, then decaying
to 0.03). The update draws and probes are seeded by ``seed``: a run is deterministic and
resumes exactly from a ``state_dict``. The weight decay is kron's (``u + wd·p`` after
preconditioning, the same as decoupled ``p (1 - lr·wd)``), applied to every parameter.
Differences from kron (balancing, seeded draws, float64 kept, no ``memory_save_mode``) are
listed in distopt/preconditioners/psgd_kron.py. The Q factors are float32 for bfloat16/float16
parameters and kept so through ``load_state_dict``.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators.moments import FirstMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, Rule, _real, gt, integer, interval
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.psgd_kron import KronPreconditioner


@register
class PSGDKron(DistOptimizer):
    __doc__ = __doc__
    name = "psgd_kron"
    family = "second_order"
    keep_state_dtypes = True
    reference = "naive float64 loop of Li's Kronecker-factored PSGD as in kron/timm (tests/reference/test_curvature.py)"
    hyper = {
        "lr": Hyper(1e-3, LR.rule),
        "b1": Hyper(0.9, interval(0.0, 1.0)),
        "weight_decay": WEIGHT_DECAY,
        "preconditioner_update_probability": Hyper(
            None, Rule(lambda x: x is None or (_real(x) and 0.0 < x <= 1.0), "None or in (0.0, 1.0]")),
        "max_size_triangular": Hyper(8192, integer(1)),
        "min_ndim_triangular": Hyper(2, integer(1)),
        "precond_lr": Hyper(0.1, gt(0.0)),
        "precond_init_scale": Hyper(1.0, gt(0.0)),
        "momentum_into_precond_update": Hyper(True, FLAG),
        "seed": Hyper(0, integer(0)),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            FirstMoment(group["b1"], key="momentum_buffer"),
            KronPreconditioner(
                group["b1"], group["preconditioner_update_probability"], group["max_size_triangular"],
                group["min_ndim_triangular"], group["precond_lr"], group["precond_init_scale"],
                group["momentum_into_precond_update"], group["seed"],
            ),
            DecoupledWeightDecay(group["weight_decay"]),
            ApplyLR(),
        )
