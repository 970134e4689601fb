"""P operator: K-FAC natural gradient for ``nn.Linear`` and ``nn.Conv2d`` layers (Martens & Grosse,
"Optimizing Neural Networks with Kronecker-factored Approximate Curvature", ICML 2015; convolutions
as in Grosse & Martens, "A Kronecker-factored approximate Fisher matrix for convolution layers",
ICML 2016), with the SGD-style momentum / weight decay / KL clipping of the popular PyTorch
implementations (alecwangcq/KFAC-Pytorch, gpauloski/kfac-pytorch).

For a layer with input rows ā_r (the input, or the conv patches, with a trailing 1 when it has a
bias; N rows, N = batch·locations) and output gradients g_r (B = batch size; ĝ = B·g when the
loss is a batch mean, ``batch_averaged``):

    A_batch = (1/N) Σ_r ā_r ā_rᵀ;      G_batch = (1/B) Σ_r ĝ_r ĝ_rᵀ
    every ``cov_update_freq`` steps:   F <- ε_k F + (1 - ε_k) F_batch,  ε_k = min(1 - 1/k, stat_decay)
                                       (k = number of factor updates so far: the first one copies)
    every ``inv_update_freq`` steps:   A⁻¹ = (A + π√λ I)⁻¹,  G⁻¹ = (G + √λ/π I)⁻¹
        (factored Tikhonov; π = sqrt((tr A / dim A) / (tr G / dim G)) with ``pi_correction``, else 1)
    V = G⁻¹ [∇W, ∇b] A⁻¹                (∇W viewed as out x in·kh·kw)
    with ``kl_clip``: V <- ν V,  ν = min(1, sqrt(kl_clip / |Σ lr² ⟨V, ∇⟩|))
        (the sum runs over this param group's K-FAC layers)

Locality MATRIX: a layer's factors need its whole weight matrix (and bias). With ``kl_clip`` the
scalar ν also couples all K-FAC layers of a param group (a sharded step must all-reduce the sum).

Rules users must know:

- **Which params get K-FAC.** Only the weight (and bias) of ``nn.Linear`` and ``nn.Conv2d``
  (groups=1, zero padding given as numbers) modules registered from the model passed to the
  optimizer. Every other param — and every param when the optimizer was given plain tensors —
  gets the plain gradient direction (SGD with momentum), as in kfac-pytorch. A weight shared by
  several modules (tied embeddings) is left to the plain direction. A layer's weight and bias
  must be in the same param group (they are preconditioned jointly).
- **Statistics come from the last forward (with grad enabled) and the last backward through the
  layer before ``step()``**, captured by a forward hook and a hook on the output's gradient, and
  dropped after the step; with gradient accumulation that is the last micro-batch. A layer
  called twice in one forward keeps the last call. Until a layer has statistics it gets the
  plain direction.
- Factors and inverses live in ``optimizer.state[weight]`` (``kfac_A``, ``kfac_G``,
  ``kfac_A_inv``, ``kfac_G_inv``; float32 for bfloat16/float16 weights) with python-int counters
  ``kfac_factor_updates``, ``kfac_inverse_updates`` and ``kfac_skipped``. A non-finite batch
  factor, or damped factors that are not positive definite, are skipped and counted in
  ``kfac_skipped``: the previous factors / inverses stay in use, parameters never turn NaN.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.scenarios.regularization import AddWeightDecay


@dataclass(eq=False)
class KFACLayer:
    """One supported module, its params and the statistics captured since the last step."""

    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    name: str
    owner: Callable[[], Any] = lambda: None
    a: Tensor | None = None
    g: Tensor | None = None
    handles: list[Any] = field(default_factory=list)

    @property
    def dims(self) -> tuple[int, int]:
        """(dim A, dim G)."""
        return self.weight[0].numel() + (self.bias is not None), self.weight.shape[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.a = self.g = None

    def _capture_g(self, grad: Tensor) -> None:
        self.g = grad.detach()

    def forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if self.owner() is None:  # the optimizer is gone: stop capturing
            self.remove()
            return
        if not torch.is_grad_enabled() or not inputs or not isinstance(output, Tensor):
            return
        self.a = inputs[0].detach()
        if output.requires_grad:
            output.register_hook(self._capture_g)


def supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def register_layers(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, KFACLayer]:
    """Hook every supported module of ``model`` whose weight ``optimizer`` holds; returns
    ``id(param) -> layer`` for the weights and biases that get K-FAC."""
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    layers: dict[int, KFACLayer] = {}
    owner = weakref.ref(optimizer)
    for name, m in model.named_modules():
        if not supported(m):
            continue
        w = m.weight
        if id(w) not in group_of or not w.requires_grad or owners[id(w)] > 1:
            continue
        b = m.bias
        if b is None or id(b) not in group_of or not b.requires_grad or owners[id(b)] > 1:
            b = None
        elif group_of[id(b)] != group_of[id(w)]:
            raise ValueError(
                f"kfac: the weight and bias of layer {name!r} are in different param groups; K-FAC "
                "preconditions them jointly (the bias is a column of A), so put them in the same group"
            )
        layer = KFACLayer(m, w, b, name, owner)
        layer.handles.append(m.register_forward_hook(layer.forward_hook))
        layers[id(w)] = layer
        if b is not None:
            layers[id(b)] = layer
    return layers


def batch_factors(layer: KFACLayer, dtype: torch.dtype, batch_averaged: bool) -> tuple[Tensor, Tensor]:
    """(A_batch, G_batch) from the captured input and output gradient, in ``dtype``."""
    a, g, m = layer.a.to(dtype), layer.g.to(dtype), layer.module
    if isinstance(m, nn.Conv2d):
        if a.ndim == 3:  # unbatched input
            a, g = a.unsqueeze(0), g.unsqueeze(0)
        batch = a.shape[0]
        patches = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, C·kh·kw, L)
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        g = g.movedim(1, -1).reshape(-1, g.shape[1])
    else:
        batch = a.shape[0] if a.ndim > 1 else 1
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    if batch_averaged:
        g = g * batch
    return a.T @ a / a.shape[0], g.T @ g / batch


def damped_inverses(A: Tensor, G: Tensor, damping: float, pi_correction: bool) -> tuple[Tensor, Tensor] | None:
    """((A + π√λ I)⁻¹, (G + √λ/π I)⁻¹) by Cholesky, or None when not positive definite / finite."""
    pi = 1.0
    if pi_correction:
        ta, tg = (torch.trace(A) / A.shape[0]).item(), (torch.trace(G) / G.shape[0]).item()
        if ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg):
            pi = math.sqrt(ta / tg)
    root = math.sqrt(damping)
    out = []
    for M, shift in ((A, pi * root), (G, root / pi)):
        L, info = torch.linalg.cholesky_ex(M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device))
        inv = torch.cholesky_inverse(L)
        if info.item() != 0 or not torch.isfinite(inv).all():
            return None
        out.append(inv)
    return out[0], out[1]


class KFACPreconditioner(Operator):
    """Replace the updates of K-FAC layers' params by ``G⁻¹ [∇W, ∇b] A⁻¹`` (see module docstring)."""

    stage = Stage.P
    locality = Locality.MATRIX

    def __init__(self, layers: Mapping[int, KFACLayer], stat_decay: float = 0.95, damping: float = 1e-3,
                 pi_correction: bool = True, cov_update_freq: int = 1, inv_update_freq: int = 10,
                 kl_clip: float | None = None, batch_averaged: bool = True) -> None:
        self.layers, self.stat_decay, self.damping, self.pi_correction = layers, stat_decay, damping, pi_correction
        self.cov_update_freq, self.inv_update_freq = cov_update_freq, inv_update_freq
        self.kl_clip, self.batch_averaged = kl_clip, batch_averaged

    def init(self, param: Tensor) -> dict[str, Any]:
        layer = self.layers.get(id(param))
        if layer is None or layer.weight is not param:
            return {}
        da, dg = layer.dims
        kw = dict(dtype=torch.promote_types(param.dtype, torch.float32), device=param.device)
        return {"kfac_A": torch.zeros(da, da, **kw), "kfac_G": torch.zeros(dg, dg, **kw),
                "kfac_A_inv": torch.zeros(da, da, **kw), "kfac_G_inv": torch.zeros(dg, dg, **kw),
                "kfac_factor_updates": 0, "kfac_inverse_updates": 0, "kfac_skipped": 0}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        out = list(updates)
        index = {id(p): i for i, p in enumerate(ctx.params)}
        seen: set[int] = set()
        clipped: list[int] = []
        vg = None
        for p in ctx.params:
            layer = self.layers.get(id(p))
            if layer is None or id(layer) in seen:
                continue
            seen.add(id(layer))
            iw = index.get(id(layer.weight))
            ib = index.get(id(layer.bias)) if layer.bias is not None else None
            if iw is not None:
                state = ctx.states[iw]
                self._refresh(layer, state, ctx.steps[iw])
                if state["kfac_inverse_updates"]:
                    v, grad = self._natural(layer, state, updates, iw, ib)
                    out[iw] = v[:, : layer.weight[0].numel()].reshape(layer.weight.shape).to(updates[iw].dtype)
                    clipped.append(iw)
                    if ib is not None:
                        out[ib] = v[:, -1].to(updates[ib].dtype)
                        clipped.append(ib)
                    if self.kl_clip is not None:
                        term = (v * grad).sum() * ctx.group["lr"] ** 2
                        vg = term if vg is None else vg + term
            layer.a = layer.g = None  # statistics are used once
        if vg is not None and clipped:
            total = abs(vg.item())
            nu = min(1.0, math.sqrt(self.kl_clip / total)) if total > 0 else 1.0
            for i in clipped:
                out[i] = out[i] * nu
        return out

    def _refresh(self, layer: KFACLayer, state: dict[str, Any], t: int) -> None:
        if (t - 1) % self.cov_update_freq == 0 and layer.a is not None and layer.g is not None:
            A, G = batch_factors(layer, state["kfac_A"].dtype, self.batch_averaged)
            if torch.isfinite(A).all() and torch.isfinite(G).all():
                k = state["kfac_factor_updates"] + 1
                decay = min(1.0 - 1.0 / k, self.stat_decay)
                state["kfac_A"].mul_(decay).add_(A, alpha=1.0 - decay)
                state["kfac_G"].mul_(decay).add_(G, alpha=1.0 - decay)
                state["kfac_factor_updates"] = k
            else:
                state["kfac_skipped"] += 1
        due = (t - 1) % self.inv_update_freq == 0 or state["kfac_inverse_updates"] == 0
        if state["kfac_factor_updates"] and due:
            inverses = damped_inverses(state["kfac_A"], state["kfac_G"], self.damping, self.pi_correction)
            if inverses is None:
                state["kfac_skipped"] += 1
            else:
                state["kfac_A_inv"].copy_(inverses[0])
                state["kfac_G_inv"].copy_(inverses[1])
                state["kfac_inverse_updates"] += 1

    @staticmethod
    def _natural(layer: KFACLayer, state: dict[str, Any], updates: list[Tensor], iw: int,
                 ib: int | None) -> tuple[Tensor, Tensor]:
        """(V, [∇W, ∇b]) as (out x dim A) matrices in the factors' dtype."""
        dtype = state["kfac_A"].dtype
        cols = [updates[iw].to(dtype).reshape(layer.weight.shape[0], -1)]
        if layer.bias is not None:
            gb = updates[ib].to(dtype) if ib is not None else torch.zeros_like(cols[0][:, 0])
            cols.append(gb.reshape(-1, 1))
        grad = torch.cat(cols, dim=1) if len(cols) > 1 else cols[0]
        return state["kfac_G_inv"] @ grad @ state["kfac_A_inv"], grad


class PreconditionedAddWeightDecay(AddWeightDecay):
    """Coupled weight decay ``u <- u + wd·p`` added *after* the natural gradient, as SGD does in
    the K-FAC implementations (the decay is not preconditioned); hence stage P."""

    stage = Stage.P
