"""K-FAC (Martens & Grosse, "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature", ICML 2015; Grosse & Martens, ICML 2016 for convolutions) for ``nn.Linear`` and
``nn.Conv2d``, followed by SGD's momentum and weight decay as in the popular PyTorch
implementations (alecwangcq/KFAC-Pytorch, gpauloski/kfac-pytorch):

    V = G⁻¹ [∇W, ∇b] A⁻¹   (damped running Kronecker factors, optionally KL-clipped)
    d = V + wd·p;   b <- μ b + d  (b_1 = d);   p <- p - lr·b

Usage::

    opt = distopt.create("kfac", model, lr=0.05)            # hooks on model's Linear/Conv2d layers
    opt = distopt.create("kfac", param_groups, model=model)  # param groups, hooks from ``model``
    loss = loss_fn(model(x), y); opt.zero_grad(); loss.backward(); opt.step()

Rules (details in distopt/preconditioners/kfac.py): the first argument may be an ``nn.Module``
(its ``parameters()`` are optimized) or params / param groups with ``model=`` giving the module
to hook. Params not covered by a supported layer — all of them when no model is given — get the
plain direction (SGD with momentum), as in kfac-pytorch. Statistics are taken from the last
forward/backward before ``step()`` (with ``batch_averaged=True`` the loss is assumed to be a mean
over the first dim of the layers' inputs). The factor EMA follows Martens & Grosse's
ε_k = min(1 - 1/k, ``stat_decay``); ``damping`` λ is factored Tikhonov (π-corrected with
``pi_correction``); ``kl_clip=None`` disables KL clipping, whose sum runs over the layers of one
param group. ``remove_hooks()`` detaches the hooks (they also stop once the optimizer is
garbage-collected).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import FLAG, LR, OPTIONAL_POSITIVE, WEIGHT_DECAY, gt, integer, interval
from distopt.preconditioners.apply import ApplyLR
from distopt.preconditioners.kfac import KFACPreconditioner, PreconditionedAddWeightDecay, register_layers
from distopt.preconditioners.momentum import PreconditionedHeavyBall

LAYERS = "_kfac_layers"  # key of the step-time copy of a group that carries the hooked layers


@register
class KFAC(DistOptimizer):
    __doc__ = __doc__
    name = "kfac"
    family = "second_order"
    keep_state_dtypes = True
    reference = "naive float64 K-FAC loop with explicit im2col (tests/reference/test_curvature.py)"
    hyper = {
        "lr": Hyper(0.01, LR.rule),
        "momentum": Hyper(0.9, interval(0.0, 1.0)),
        "weight_decay": WEIGHT_DECAY,
        "stat_decay": Hyper(0.95, interval(0.0, 1.0)),
        "damping": Hyper(1e-3, gt(0.0)),
        "pi_correction": Hyper(True, FLAG),
        "cov_update_freq": Hyper(1, integer(1)),
        "inv_update_freq": Hyper(10, integer(1)),
        "kl_clip": Hyper(1e-3, OPTIONAL_POSITIVE),
        "batch_averaged": Hyper(True, FLAG),
    }

    def __init__(self, params: Any, model: nn.Module | None = None, **hparams: Any) -> None:
        if isinstance(params, nn.Module):
            if model is not None and model is not params:
                raise ValueError("kfac: pass the model either as the first argument or as model=, not both")
            model, params = params, params.parameters()
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"kfac: model must be an nn.Module, got {type(model).__name__}")
        super().__init__(params, **hparams)
        self._layers = register_layers(self, model) if model is not None else {}

    @property
    def layers(self) -> list[str]:
        """Names of the modules preconditioned with K-FAC."""
        return list(dict.fromkeys(layer.name for layer in self._layers.values()))

    def remove_hooks(self) -> None:
        """Detach the hooks; every param then gets the plain (SGD with momentum) direction."""
        for layer in self._layers.values():
            layer.remove()
        self._layers = {}

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(
            KFACPreconditioner(
                group.get(LAYERS, {}), group["stat_decay"], group["damping"], group["pi_correction"],
                group["cov_update_freq"], group["inv_update_freq"], group["kl_clip"], group["batch_averaged"],
            ),
            PreconditionedAddWeightDecay(group["weight_decay"]),
            PreconditionedHeavyBall(group["momentum"]),
            ApplyLR(),
        )

    def _step_group(self, group: dict[str, Any], params: list, grads: list) -> None:
        # the recipe sees the hooked layers through a step-time copy of the group, so they never
        # enter param_groups / state_dict
        super()._step_group({**group, LAYERS: self._layers}, params, grads)
