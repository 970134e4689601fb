"""SOAP (Vyas et al., "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321, 2024):
Adam run in the eigenbasis of Shampoo's factors, with the authors' hyperparameters and the order of
operations of their reference ``soap.py`` (github.com/nikhilvyas/SOAP).

Per tensor, at step t (τ = t - 1 counts Adam steps), with GG_i, Q_i for every dimension i of the
view of size <= ``max_precond_dim`` (see :mod:`distopt.preconditioners.eigenbasis`):

    GG_i <- lerp(GG_i, G_(i) G_(i)ᵀ, 1 - shampoo_beta)            (shampoo_beta = -1: β2)
    t = 1:  Q_i = eigenvectors of GG_i (eigh, descending); no parameter update
    t > 1:  G' = G ×_i Q_iᵀ;  m <- β1 m + (1-β1) G';  v <- β2 v + (1-β2) G'²
            u = (m / (sqrt(v) + ε)) ×_i Q_i;  u <- u / (1e-30 + rms(u)) if normalize_grads
            p <- p - lr · sqrt(1-β2^τ)/(1-β1^τ) · u       (factor 1 if correct_bias=False)
            p <- p (1 - lr·wd)                            (decoupled, *after* the step, as the reference)
            every precondition_frequency Adam steps: Q_i <- qr(GG_i Q_i[:, σ]).Q (one power iteration,
            σ sorts the estimated eigenvalues), v permuted by σ, m carried into the new basis

Views: tensors keep their shape (each dimension its own factor, the reference's default), or with
``merge_dims=True`` consecutive dimensions are merged while their product stays <= max_precond_dim
(the reference's rule; a small conv kernel becomes one dimension). 1-D tensors get a factor only
with ``precondition_1d=True``; without one (and for dimensions > max_precond_dim) that side stays in
the standard basis, so a 1-D-only group is Adam (the reference's eps placement, first step skipped).

Deviations from the reference, all below float64 round-off in the tests: GG, Q and the moments are
float32 or wider (the reference keeps GG/Q in float32 whatever the parameter dtype, the moments in
the parameter's dtype); m is carried into a new basis only when the basis changes (the reference
rotates it back and forth every step, an identity up to round-off); only the ``channels_first``
data format is supported (no ``data_format`` option).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, FLAG, Rule, _real, betas, ge, integer
from distopt.preconditioners.apply import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.eigenbasis import AfterFirstStep, EigenbasisAdam, EigenbasisRefresh, SoapFactors


@register
class SOAP(DistOptimizer):
    keep_state_dtypes = True
    __doc__ = __doc__
    name = "soap"
    family = "second_order"
    reference = "naive per-tensor loop of the reference soap.py (nikhilvyas/SOAP) in float64"
    hyper = {
        "lr": Hyper(3e-3, ge(0.0)),
        "betas": Hyper((0.95, 0.95), betas(2)),
        "shampoo_beta": Hyper(-1, Rule(lambda x: _real(x) and (x == -1 or 0.0 <= x < 1.0),
                                       "-1 (use β2) or in [0, 1)")),
        "eps": EPS,
        "weight_decay": Hyper(0.01, ge(0.0)),
        "precondition_frequency": Hyper(10, integer(1)),
        "max_precond_dim": Hyper(10000, integer(1)),
        "merge_dims": Hyper(False, FLAG),
        "precondition_1d": Hyper(False, FLAG),
        "normalize_grads": Hyper(False, FLAG),
        "correct_bias": Hyper(True, FLAG),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        view = dict(max_dim=group["max_precond_dim"], merge=group["merge_dims"],
                    precondition_1d=group["precondition_1d"])
        shampoo_beta = group["betas"][1] if group["shampoo_beta"] == -1 else group["shampoo_beta"]
        return chain(
            SoapFactors(shampoo_beta, **view),
            AfterFirstStep(chain(
                EigenbasisAdam(group["betas"], group["eps"], group["correct_bias"], group["normalize_grads"], **view),
                ApplyLR(group["lr"]),
                DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            )),
            EigenbasisRefresh(group["precondition_frequency"], **view),
        )
