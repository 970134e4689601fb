"""Shampoo (Gupta, Koren & Singer, ICML 2018) as scaled up by Anil et al., "Scalable Second Order
Optimization for Deep Learning" (2020), with the options of Distributed Shampoo
(Shi et al., arXiv:2309.06497; facebookresearch/optimizers): blocking, grafting, a start step,
β1 filtering, SGD momentum on the direction, decoupled weight decay.

One step at count t (1-based), for every parameter, with g its gradient:

    g <- g + wd·p                                  (only if decoupled_weight_decay=False)
    statistics of the raw g: L_b, R_b += G_b G_bᵀ, G_bᵀ G_b     (β2 < 1: EMA with weight 1 - β2)
                             grafting accumulator a             (adagrad / rmsprop / adam)
    m <- β1 m + (1 - β1) g;  m̂ = m / (1 - β1^t)     (β1 = 0: m̂ = g; no debias if use_bias_correction=False)
    at t = start and at every later t with t % precondition_frequency == 0 (never before start):
        L̃_b = (L_b / c2 + εI)^{-1/4}, R̃_b likewise, c2 = 1 - β2^t (bias correction, β2 < 1), by
        ``eigh`` (eigenvalues clamped at 0, then + ε) or ``coupled_newton``, computed in ``root_dtype``
        (None: the factors' dtype); on failure (LinAlgError or non-finite) the previous root is kept
        (initially I) and the parameter's ``root_failures`` counts it
    u = grafting direction D(m̂)                          if t < start_preconditioning_step
    u_b = L̃_b M̂_b R̃_b · ||D_b|| / ||L̃_b M̂_b R̃_b||     otherwise (no rescaling for grafting="none")
    b <- μ b + u;  u <- u + μ b (nesterov) or b        (only if momentum > 0)
    p <- p (1 - lr·wd) (decoupled);   p <- p - lr·u

Layout (:mod:`distopt.preconditioners.blocks`): tensors with ndim >= 2 are the matrix
(shape[0], prod(shape[1:])); each side is split into near-equal blocks of at most
``max_preconditioner_dim``; every block has its own L, R and roots (state keys ``L_k``, ``R_k``,
``L_root_k``, ``R_root_k``, in float32 or wider; see :func:`~distopt.preconditioners.blocks.block_slices`).

1-D tensors (biases, norm gains) and scalars: with ``precondition_1d=True`` they are columns with a
left factor only, u_b = (L_b / c2 + εI)^{-1/2} m̂_b (full-matrix AdaGrad, blocked). With the default
``precondition_1d=False`` they are Shampoo on 1 x 1 blocks: the grafting direction D (the grafted
1 x 1 Shampoo step is exactly D), or, with ``grafting="none"``, the diagonal m̂ / sqrt(L_diag / c2 + ε).
A group of only 1-D tensors therefore always works. Before ``start_preconditioning_step`` (default:
``precondition_frequency``) every tensor takes D, which is m̂ itself (SGD) for grafting "none".

Non-finite gradients raise ``FloatingPointError`` naming the parameter's shape (one fused norm and
one host synchronisation per step), before any state or parameter is written; non-finite factors
(overflow) raise it too when roots are due. Degenerate cases (tested): with the start beyond
the horizon, grafting "adam" is AdamW/Adam, "adagrad" is Adagrad, "rmsprop" is RMSprop and "sgd"
(β1 = 0, momentum) is SGD with momentum.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from distopt.accumulators.moments import FirstMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, WEIGHT_DECAY, Rule, _real, ge, integer, interval, one_of
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.grafting import GRAFTING, GraftingAccumulator
from distopt.preconditioners.kronecker import KroneckerFactors, KroneckerInverseRoots, KroneckerPrecondition
from distopt.preconditioners.moment_debias import DebiasMoment
from distopt.preconditioners.nesterov_momentum import PreconditionedMomentum
from distopt.scenarios import AddWeightDecay
from distopt.scenarios.finite import RequireFinite


def _shampoo_betas(b: Any) -> bool:
    return (isinstance(b, (tuple, list)) and len(b) == 2 and all(_real(x) for x in b)
            and 0.0 <= b[0] < 1.0 and 0.0 < b[1] <= 1.0)


def start_step(group: Mapping[str, Any]) -> int:
    """``start_preconditioning_step``, where None means ``precondition_frequency``."""
    start = group["start_preconditioning_step"]
    return group["precondition_frequency"] if start is None else start


@register
class Shampoo(DistOptimizer):
    keep_state_dtypes = True
    __doc__ = __doc__
    name = "shampoo"
    family = "second_order"
    reference = ("naive full-matrix Shampoo L^-1/4 G R^-1/4 per block (float64, eigh); "
                 "torch.optim.AdamW/Adam/Adagrad/RMSprop/SGD for grafting-only runs")
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 1.0), Rule(_shampoo_betas, "a tuple (β1, β2) with β1 in [0, 1) and β2 in (0, 1]")),
        "epsilon": Hyper(1e-12, ge(0.0)),
        "momentum": Hyper(0.0, interval(0.0, 1.0)),
        "nesterov": Hyper(False, FLAG),
        "weight_decay": WEIGHT_DECAY,
        "decoupled_weight_decay": Hyper(True, FLAG),
        "max_preconditioner_dim": Hyper(1024, integer(1)),
        "precondition_frequency": Hyper(10, integer(1)),
        "start_preconditioning_step": Hyper(None, Rule(
            lambda x: x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 1),
            "None or an integer >= 1")),
        "inverse_root_method": Hyper("eigh", one_of("eigh", "coupled_newton")),
        "root_dtype": Hyper(None, one_of(None, torch.float32, torch.float64)),
        "grafting": Hyper("adam", one_of(*GRAFTING)),
        "grafting_beta2": Hyper(0.999, interval(0.0, 1.0)),
        "grafting_eps": Hyper(1e-8, ge(0.0)),
        "use_bias_correction": Hyper(True, FLAG),
        "precondition_1d": Hyper(False, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        wd, decoupled, grafting = group["weight_decay"], group["decoupled_weight_decay"], group["grafting"]
        blocks = dict(max_dim=group["max_preconditioner_dim"], precondition_1d=group["precondition_1d"])
        debias = b1 > 0 and group["use_bias_correction"]
        return chain(
            RequireFinite(cls.name),
            AddWeightDecay(0.0 if decoupled else wd),
            GraftingAccumulator(grafting, group["grafting_beta2"]),
            KroneckerFactors(b2, diagonal_vectors=grafting == "none", **blocks),
            *([FirstMoment(b1)] if b1 > 0 else []),
            *([DebiasMoment(b1)] if debias else []),
            KroneckerInverseRoots(b2, group["epsilon"], group["precondition_frequency"], start_step(group),
                                  group["inverse_root_method"], group["root_dtype"], group["use_bias_correction"],
                                  name=cls.name, **blocks),
            KroneckerPrecondition(start_step(group), grafting, group["grafting_eps"], group["grafting_beta2"], b2,
                                  group["epsilon"], group["use_bias_correction"], **blocks),
            PreconditionedMomentum(group["momentum"], group["nesterov"]),
            DecoupledWeightDecay(wd if decoupled else 0.0, group["lr"]),
            ApplyLR(group["lr"]),
        )
