"""Lion, LAMB, LARS, LaProp, AdaBelief, AdamP, SGDP and NovoGrad against independent references
(float64, 100 steps, two param groups with different hyperparameters, foreach on and off).

References and where the packages deviate from the papers:

- Lion: ``lion_pytorch.Lion`` follows the paper exactly (decoupled wd ``p (1 - lr wd)`` first).
- LAMB: ``pytorch_optimizer.Lamb`` deviates from Algorithm 2 of the paper: it never bias-corrects
  ``v`` and, unless ``adam_debias=True``, multiplies the trust-ratio-normalised step by
  ``1 / (1 - β1^t)``; it adds ``eps`` to ``||u||`` in the ratio and clamps ``||p||`` at 10; its
  default ``weight_decouple=True`` multiplies ``p`` by ``1 - lr wd`` *before* the ratio instead of
  adding ``wd p`` to the direction. So the parity test uses a naive loop of Algorithm 2; a second
  test checks the package where the two coincide (``bias_correction=False``, ``eps=0``,
  ``weight_decouple=False``, ``adam_debias=True``; our ``||p||`` stay below its clamp).
- LARS: ``pytorch_optimizer.LARS`` skips the trust ratio *and weight decay* for tensors with
  ``ndim <= 1`` (biases), which the paper does not; naive loop of Algorithm 1 instead, written
  in the paper's form with the global lr inside the momentum buffer (equal for a constant lr),
  and a package test with ``adapt_vectors=False`` (our opt-in for that convention).
- LaProp: ``pytorch_optimizer.LaProp`` adds 1e-15 to ``v`` under the square root, puts ``eps``
  before the bias correction (``g sqrt(1-β2^t) / (sqrt(v) + ε)``) and applies decoupled weight
  decay *after* the step; naive loop of Algorithm 1 (with AdamW-style decay before the step),
  plus a package test with ``eps=0`` and no weight decay where only the 1e-15 differs.
- AdaBelief: ``pytorch_optimizer.AdaBelief`` (``rectify=False``) follows the paper's
  Algorithm 2 and the authors' code, including ``+ε`` inside ``s`` and the AMSGrad variant.
- AdamP: ``pytorch_optimizer.AdamP`` computes ``m sqrt(1-β2^t) / (sqrt(v) + ε)`` where the
  authors' code has ``m / (sqrt(v)/sqrt(1-β2^t) + ε)``: naive loop of the authors' algorithm,
  plus a package test with ``eps=0`` where the two coincide.
- SGDP: ``pytorch_optimizer.SGDP`` follows Algorithm 1 (the momentum buffer is not projected;
  the authors' code projects the buffer in place when ``nesterov=False``, which the paper does
  not). Dampening is not exposed (not in the paper).
- NovoGrad: ``pytorch_optimizer.NovoGrad`` (coupled weight decay added after normalising,
  ``m_1 = u_1``) follows the paper's Algorithm 1.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lion_pytorch import Lion as RefLion
from pytorch_optimizer import SGDP as RefSGDP
from pytorch_optimizer import AdaBelief as RefAdaBelief
from pytorch_optimizer import AdamP as RefAdamP
from pytorch_optimizer import Lamb as RefLamb
from pytorch_optimizer import LaProp as RefLaProp
from pytorch_optimizer import LARS as RefLARS
from pytorch_optimizer import NovoGrad as RefNovoGrad

import distopt
from parity import assert_parity, run


# --------------------------------------------------------------------------- naive references
class NaiveLamb(torch.optim.Optimizer):
    """You et al. 2020, Algorithm 2, one tensor at a time."""

    def __init__(self, params: Any, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 bias_correction: bool = True, adapt_vectors: bool = True):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, adapt_vectors=adapt_vectors))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                g, t = p.grad, st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                c1, c2 = (1 - b1**t, 1 - b2**t) if group["bias_correction"] else (1.0, 1.0)
                r = (st["m"] / c1) / ((st["v"] / c2).sqrt() + group["eps"])
                if p.dim() <= 1 and not group["adapt_vectors"]:
                    p -= group["lr"] * r
                    continue
                u = r + group["weight_decay"] * p
                pn, un = p.norm().item(), u.norm().item()
                ratio = pn / un if pn > 0 and un > 0 else 1.0
                p -= group["lr"] * ratio * u


class NaiveLARS(torch.optim.Optimizer):
    """You et al. 2017, Algorithm 1 (global lr inside the momentum), every tensor."""

    def __init__(self, params: Any, lr=1e-3, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd, mu = group["weight_decay"], group["momentum"]
            for p in group["params"]:
                st = self.state.setdefault(p, {})
                v = st.setdefault("v", torch.zeros_like(p))
                pn, gn = p.norm().item(), p.grad.norm().item()
                den = gn + wd * pn
                local = group["trust_coefficient"] * pn / den if pn > 0 and den > 0 else 1.0
                d = group["lr"] * local * (p.grad + wd * p)
                v.mul_(mu).add_(d)
                p -= d + mu * v if group["nesterov"] else v


class NaiveLaProp(torch.optim.Optimizer):
    """Ziyin et al. 2020, Algorithm 1, with decoupled weight decay p(1 - lr wd) before the step."""

    def __init__(self, params: Any, lr=4e-4, betas=(0.9, 0.999), eps=1e-15, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), n=torch.zeros_like(p))
                st["t"] += 1
                g, t = p.grad, st["t"]
                st["n"] = b2 * st["n"] + (1 - b2) * g * g
                st["m"] = b1 * st["m"] + (1 - b1) * g / ((st["n"] / (1 - b2**t)).sqrt() + group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p -= group["lr"] * st["m"] / (1 - b1**t)


class NaiveAdamP(torch.optim.Optimizer):
    """Heo et al. 2021, the authors' AdamP (clovaai/AdamP, adamp.py), one tensor at a time."""

    def __init__(self, params: Any, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, delta=0.1,
                 wd_ratio=0.1, nesterov=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov))

    @staticmethod
    def projection(p, grad, perturb, delta, wd_ratio, eps):
        expand = [-1] + [1] * (p.dim() - 1)
        for view in (lambda x: x.reshape(x.shape[0], -1), lambda x: x.reshape(1, -1)):
            cos = F.cosine_similarity(view(grad), view(p), dim=1, eps=eps).abs()
            if cos.max().item() < delta / math.sqrt(view(p).shape[1]):
                p_n = p / (view(p).norm(dim=1).view(expand) + eps)
                return perturb - p_n * view(p_n * perturb).sum(dim=1).view(expand), wd_ratio
        return perturb, 1.0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                st["t"] += 1
                g, t = p.grad, st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * g
                st["v"] = b2 * st["v"] + (1 - b2) * g * g
                denom = st["v"].sqrt() / math.sqrt(1 - b2**t) + group["eps"]
                perturb = (b1 * st["m"] + (1 - b1) * g if group["nesterov"] else st["m"]) / denom
                ratio = 1.0
                if p.dim() > 1:
                    perturb, ratio = self.projection(p, g, perturb, group["delta"], group["wd_ratio"], group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"] * ratio)
                p -= group["lr"] / (1 - b1**t) * perturb


# --------------------------------------------------------------------------- cases
# name -> (distopt name, reference factory, reference label, distopt groups, reference groups or None)
CASES: dict[str, tuple] = {
    "lion": ("lion", RefLion, "lion_pytorch.Lion", [
        dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=3e-4, betas=(0.95, 0.98), weight_decay=0.0)], None),
    "lamb": ("lamb", NaiveLamb, "naive loop (LAMB paper, Alg. 2)", [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01), dict(lr=3e-3, eps=1e-4, weight_decay=0.1)], None),
    "lamb-no-bias-correction-vectors": ("lamb", NaiveLamb, "naive loop (LAMB paper, Alg. 2)", [
        dict(lr=1e-2, weight_decay=0.01, bias_correction=False, adapt_vectors=False),
        dict(lr=3e-3, betas=(0.8, 0.9), weight_decay=0.1, adapt_vectors=False)], None),
    "lars-vectors-unadapted": ("lars", RefLARS, "pytorch_optimizer.LARS", [
        dict(lr=0.5, momentum=0.9, weight_decay=5e-3, trust_coefficient=0.02, adapt_vectors=False),
        dict(lr=1.0, momentum=0.8, weight_decay=0.01, trust_coefficient=0.01, nesterov=True, adapt_vectors=False)], [
        dict(lr=0.5, momentum=0.9, weight_decay=5e-3, trust_coefficient=0.02),
        dict(lr=1.0, momentum=0.8, weight_decay=0.01, trust_coefficient=0.01, nesterov=True)]),
    "lars": ("lars", NaiveLARS, "naive loop (LARS paper, Alg. 1)", [
        dict(lr=0.5, momentum=0.9, weight_decay=5e-3, trust_coefficient=0.02),
        dict(lr=1.0, momentum=0.8, weight_decay=0.0, trust_coefficient=0.01, nesterov=True)], None),
    "laprop": ("laprop", NaiveLaProp, "naive loop (LaProp paper, Alg. 1)", [
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1), dict(lr=3e-3, betas=(0.8, 0.999))], None),
    "adabelief": ("adabelief", RefAdaBelief, "pytorch_optimizer.AdaBelief", [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), dict(lr=3e-3, eps=1e-10, weight_decay=0.05)], None),
    "adabelief-coupled-amsgrad": ("adabelief", RefAdaBelief, "pytorch_optimizer.AdaBelief", [
        dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=False, amsgrad=True),
        dict(lr=3e-3, betas=(0.8, 0.9), eps=1e-12, amsgrad=True)], [
        dict(lr=1e-2, weight_decay=0.1, weight_decouple=False, ams_bound=True),
        dict(lr=3e-3, betas=(0.8, 0.9), eps=1e-12, ams_bound=True)]),
    "adamp": ("adamp", NaiveAdamP, "naive loop (AdamP authors' code)", [
        dict(lr=1e-2, weight_decay=0.1, delta=3.0, wd_ratio=0.2),
        dict(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05, delta=0.5, nesterov=True)], None),
    "adamp-eps0": ("adamp", RefAdamP, "pytorch_optimizer.AdamP", [
        dict(lr=1e-2, eps=0.0, weight_decay=0.1, delta=3.0, wd_ratio=0.2),
        dict(lr=3e-3, eps=0.0, betas=(0.8, 0.99), weight_decay=0.05, delta=0.5, nesterov=True)], None),
    "sgdp": ("sgdp", RefSGDP, "pytorch_optimizer.SGDP", [
        dict(lr=0.05, momentum=0.9, weight_decay=0.05, delta=3.0, wd_ratio=0.2),
        dict(lr=0.1, momentum=0.5, weight_decay=0.01, delta=0.5, nesterov=True)], None),
    "sgdp-no-momentum": ("sgdp", RefSGDP, "pytorch_optimizer.SGDP", [
        dict(lr=0.05, weight_decay=0.05, delta=3.0, eps=1e-6), dict(lr=0.1, delta=0.5)], None),
    "novograd": ("novograd", RefNovoGrad, "pytorch_optimizer.NovoGrad", [
        dict(lr=1e-2, betas=(0.9, 0.98), weight_decay=0.01), dict(lr=3e-3, weight_decay=0.0, eps=1e-6)], None),
    "novograd-grad-averaging": ("novograd", RefNovoGrad, "pytorch_optimizer.NovoGrad", [
        dict(lr=1e-2, weight_decay=0.01, grad_averaging=True), dict(lr=3e-3, betas=(0.8, 0.9), grad_averaging=True)],
        None),
    "lamb-v3-eps0": ("lamb", RefLamb, "pytorch_optimizer.Lamb", [
        dict(lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.01, bias_correction=False),
        dict(lr=3e-3, eps=0.0, weight_decay=0.1, bias_correction=False)], [
        dict(lr=1e-2, betas=(0.9, 0.99), eps=0.0, weight_decay=0.01, weight_decouple=False, adam_debias=True),
        dict(lr=3e-3, eps=0.0, weight_decay=0.1, weight_decouple=False, adam_debias=True)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("foreach", [True, False])
def test_parity(case: str, foreach: bool) -> None:
    name, ref_cls, label, hparams, ref_hparams = CASES[case]
    assert_parity(
        f"{case} (foreach={foreach})",
        lambda groups: distopt.create(name, groups, foreach=foreach),
        lambda groups: ref_cls(groups),
        hparams,
        reference=label,
        ref_group_hparams=ref_hparams,
    )


class RefLaPropNoFloor(RefLaProp):
    """pytorch_optimizer.LaProp with the 1e-15 it hard-codes under the square root set to 0."""

    @staticmethod
    def apply_ams_bound(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, exp_avg_sq_eps=0.0):
        return RefLaProp.apply_ams_bound(ams_bound, exp_avg_sq, max_exp_avg_sq, eps, exp_avg_sq_eps=0.0)

    @staticmethod
    def apply_ams_bound_foreach(ams_bound, exp_avg_sqs, max_exp_avg_sqs, eps, exp_avg_sq_eps=0.0):
        return RefLaProp.apply_ams_bound_foreach(ams_bound, exp_avg_sqs, max_exp_avg_sqs, eps, exp_avg_sq_eps=0.0)


@pytest.mark.parametrize("foreach", [True, False])
def test_laprop_against_package_without_eps(foreach: bool) -> None:
    """With eps=0, no weight decay and its hard-coded 1e-15 floor on v zeroed, pytorch_optimizer.LaProp
    computes the paper's update (its lr-inside-momentum form is equal for a constant lr). The package
    runs its per-tensor path: its foreach path keeps the step sizes in a float32 tensor
    (``_get_step_sizes``), which costs ~3e-9 relative in float64."""
    hparams = [dict(lr=1e-2, betas=(0.9, 0.99), eps=0.0), dict(lr=3e-3, betas=(0.8, 0.999), eps=0.0)]
    assert_parity(
        f"laprop-eps0-vs-package (foreach={foreach})",
        lambda groups: distopt.create("laprop", groups, foreach=foreach),
        lambda groups: RefLaPropNoFloor(groups, foreach=False),
        hparams,
        reference="pytorch_optimizer.LaProp (no 1e-15)",
    )


@pytest.mark.parametrize("name", ["adamp", "sgdp"])
def test_projection_is_exercised(name: str) -> None:
    """The delta values of the parity cases do project (a never-projecting run ends elsewhere)."""
    base = {"adamp": CASES["adamp"][3], "sgdp": CASES["sgdp"][3]}[name]
    never = [{**g, "delta": 0.0} for g in base]
    a = run(lambda groups: distopt.create(name, groups), base)
    b = run(lambda groups: distopt.create(name, groups), never)
    for i in (0, 2):  # the 2-D weights of each group
        assert (a[i] - b[i]).abs().max() > 1e-4
