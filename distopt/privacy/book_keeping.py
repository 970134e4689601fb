"""Book-keeping ghost clipping (``make_private(..., grad_sample_mode="ghost_bk")``): DP-SGD's clipped
gradient in ONE backward pass (Bu, Wang, Zha, Karypis, "Differentially Private Optimization on
Large Model at Small Cost", ICML 2023).

Rule. A supported layer keeps its input activations ``a`` (B, T, d) in a forward hook. The single
backward is ``torch.autograd.grad(Σ_i loss_i, layer outputs' gradient edges)``: autograd computes
the output gradients ``g`` (B, T, p) of every layer and, since no parameter is asked for, skips
every weight-gradient kernel (no parameter gradient, no second pass; ``requires_grad`` is never
touched; holding edges, not outputs, keeps no output alive and reads g before any in-place op).
Then, per sample i and layer, with ``G_i = g_iᵀ a_i``:

- ghost norm ``‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)`` when ``T(d+p) < d·p`` (cost T²(d+p); layers
  reading the same input share its Gram matrix), else the per-sample gradients G_i themselves
  (cost T·d·p, the weight gradient's own matmul; then B·d·p ≤ B·T·(d+p): they are kept instead of
  a and g, so the ghost norm is used only where it saves memory); ``‖g_i‖²‖a_i‖²`` when T = 1;
  bias ``‖Σ_t g_t‖²``;
- ``‖∇ℓ_i‖ = sqrt(Σ_layers ‖G_i‖²)`` and Opacus' flat coefficient ``c_i = min(1, C / (‖∇ℓ_i‖ + 1e-6))``;
- ``p.grad = Σ_i c_i G_i``: ``(c ⊙ g)ᵀ a``, one matmul per layer as the non-private weight
  gradient (book-keeping), or ``c · G`` where G was kept.

``p.grad`` is then exactly what Opacus' two-pass ghost clipping leaves after its second backward,
so Opacus' ``DPOptimizerFastGradientClipping`` (noise, 1/expected-batch scaling, accounting hook,
virtual steps) runs on it unchanged. Data-parallel: a ``DistributedDataParallel`` or Opacus ``DPDDP``
module is run through its inner module, so DDP's reducer never sees a gradient; Opacus'
``DistributedDPOptimizerFastGradientClipping`` all-reduces the clipped sums (its ``reduce_gradients``,
one all-reduce per parameter) after rank 0 alone added the noise. FSDP is refused: its parameters
are flat shards, not the layers' weights.

Layers: ``nn.Linear`` (any leading dims), ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.Conv2d`` (unfold; groups = 1, zero padding); more types via :func:`register_layer` with one of
these rules. A trainable parameter elsewhere is refused.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

STABILIZER = 1e-6  # Opacus: C / (‖g‖ + 1e-6)


def _bt(x: Tensor) -> Tensor:
    """(B, ..., d) -> (B, T, d)."""
    return x.reshape(x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1])


def _trainable(t: Tensor | None) -> bool:
    return t is not None and t.requires_grad


def _as_bt(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Activations and output gradients of a linear-like layer as (B, T, d), (B, T, p)."""
    if isinstance(layer, nn.Conv2d):
        a = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride).transpose(1, 2)
        return a.to(g.dtype), g.reshape(g.shape[0], g.shape[1], math.prod(g.shape[2:])).transpose(1, 2)
    return _bt(a).to(g.dtype), _bt(g)


Finish = Callable[[Tensor], dict]  # clipping coefficients c (B,) -> {param: Σ_i c_i ∇_param loss_i}


def _sq(x: Tensor) -> Tensor:
    """Per-sample squared norms of ``x`` (B, ...), in one fused reduction (no x*x temporary)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).square()


def _gram(x: Tensor, cache: dict | None) -> Tensor:
    """``x xᵀ`` per sample (B, T, T); layers reading the same input (q/k/v, gate/up) share one."""
    key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype) if cache is not None else None
    if key is not None and key in cache:
        return cache[key]
    gram = torch.bmm(x, x.transpose(1, 2))
    if key is not None:
        cache[key] = gram
    return gram


def linear_rule(layer: nn.Module, a: Tensor, g: Tensor, cache: dict | None = None) -> tuple[Tensor, Finish]:
    """``nn.Linear`` / ``nn.Conv2d``: per-sample squared norms and the weighted-gradient step.

    T = 1: ``‖g_i‖²‖a_i‖²``; ``T(d+p) < d·p``: ghost norm (``cache`` shares the input's Gram matrix
    between layers that read the same input); else the per-sample gradients G_i (B, p, d), which are
    then no larger than a and g and replace them (the final step is ``Σ_i c_i G_i``). In time the
    per-sample gradients always win (their bmm is the weight gradient's own matmul, the ghost norm
    adds the Gram matrices to it), so the ghost norm is chosen only where it saves memory."""
    a, g = _as_bt(layer, a, g)
    (b, t, d), p = a.shape, g.shape[-1]
    w, bias = layer.weight, layer.bias if _trainable(layer.bias) else None
    gb = (g[:, 0] if t == 1 else g.sum(1)) if bias is not None else None  # per-sample bias gradients (B, p)
    sq = _sq(gb) if gb is not None else g.new_zeros(b)
    per_sample = None
    if w.requires_grad:
        if t == 1:
            sq = sq + _sq(g) * _sq(a)
        elif t * (d + p) < d * p:  # ghost norm: Σ_{t,s} (a_t·a_s)(g_t·g_s); it only saves memory
            gram_a, gram_g = _gram(a, cache), torch.bmm(g, g.transpose(1, 2))
            sq = sq + torch.linalg.vecdot(gram_a.flatten(1), gram_g.flatten(1))
            del gram_a, gram_g
        else:
            per_sample = torch.bmm(g.transpose(1, 2), a)
            sq = sq + _sq(per_sample)

    def finish(c: Tensor) -> dict:
        c = c.to(sq.dtype)
        out = {bias: c @ gb} if bias is not None else {}
        if not w.requires_grad:
            return out
        if per_sample is not None:
            gw = (c @ per_sample.reshape(b, -1)).reshape(p, d)
        else:  # one matmul, scaling the smaller of a, g
            a2, g2 = (a * c.view(-1, 1, 1), g) if d <= p else (a, g * c.view(-1, 1, 1))
            gw = g2.reshape(-1, p).t() @ a2.reshape(-1, d)
        return {**out, w: gw.reshape(w.shape)}
    if per_sample is not None:
        del a, g
    return sq, finish


def embedding_rule(layer: nn.Embedding, ids: Tensor, g: Tensor) -> tuple[Tensor, Finish]:
    """``‖G_i‖² = Σ_{t,s} [id_t = id_s] g_t·g_s``; ``grad = index_add(c ⊙ g)``; padding rows get nothing."""
    ids, g = ids.reshape(ids.shape[0], math.prod(ids.shape[1:])), _bt(g)
    if layer.padding_idx is not None:
        g = g * (ids != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    same = (ids.unsqueeze(2) == ids.unsqueeze(1)).to(g.dtype)
    sq = (same * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))

    def finish(c: Tensor) -> dict:
        c = c.to(g.dtype)
        grad = torch.zeros(layer.weight.shape, dtype=g.dtype, device=g.device)
        return {layer.weight: grad.index_add_(0, ids.flatten(), (g * c.view(-1, 1, 1)).reshape(-1, g.shape[-1]))}
    return sq, finish


def _norm_rule(normalize: Callable[[nn.Module, Tensor], Tensor]) -> Callable:
    """Normalization layers: the per-sample gradients (B, n) are cheap and small, computed directly."""
    def rule(layer: nn.Module, a: Tensor, g: Tensor) -> tuple[Tensor, Finish]:
        n = math.prod(layer.weight.shape)
        g = g.reshape(g.shape[0], g.numel() // max(1, g.shape[0] * n), n)
        per = {}
        if _trainable(layer.weight):
            per[layer.weight] = (g * normalize(layer, a.to(g.dtype)).reshape(g.shape)).sum(1)
        if _trainable(getattr(layer, "bias", None)):
            per[layer.bias] = g.sum(1)
        sq = torch.stack([(v * v).sum(-1) for v in per.values()]).sum(0)
        return sq, lambda c: {p: (c.to(v.dtype) @ v).reshape(p.shape) for p, v in per.items()}
    return rule


layer_norm_rule = _norm_rule(lambda m, a: F.layer_norm(a, m.normalized_shape, eps=m.eps))
rms_norm_rule = _norm_rule(lambda m, a: F.rms_norm(a, tuple(m.weight.shape), eps=getattr(m, "eps", None)))
RULES: dict[str, Callable] = {"linear": linear_rule, "embedding": embedding_rule, "layer_norm": layer_norm_rule,
                              "rms_norm": rms_norm_rule}
LAYERS: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "linear", nn.Embedding: "embedding",
                           nn.LayerNorm: "layer_norm", nn.RMSNorm: "rms_norm"}


def register_layer(cls: type, rule: str) -> None:
    """Treat modules of type ``cls`` with ``rule`` (one of RULES: attributes weight/bias/eps as the torch layer)."""
    if rule not in RULES:
        raise ValueError(f"register_layer: invalid rule={rule!r}; it must be one of {', '.join(RULES)}")
    LAYERS[cls] = rule


def _check_layer(name: str, m: nn.Module) -> None:
    bad = None
    if isinstance(m, nn.Embedding) and (m.sparse or m.scale_grad_by_freq or m.max_norm is not None):
        bad = "sparse=True, scale_grad_by_freq=True or max_norm"
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)):
        bad = "groups != 1, a padding_mode other than 'zeros' or a string padding"
    if bad:
        raise NotImplementedError(f"grad_sample_mode='ghost_bk': {name} ({type(m).__name__}) uses {bad}, which has no "
                                  "book-keeping rule; use grad_sample_mode='ghost' (Opacus' two-pass) or 'hooks'")


def _data_parallel_inner(module: nn.Module) -> nn.Module:
    """The module a DDP / DPDDP wrapper runs (parameters broadcast at its construction); else ``module``."""
    wrapper = type(module).__name__ == "DifferentiallyPrivateDistributedDataParallel"  # Opacus' DPDDP
    return module.module if wrapper or isinstance(module, DistributedDataParallel) else module


class BookKeepingModule(nn.Module):
    """Wraps ``module`` (as Opacus' GradSampleModule: ``._module``, unknown attributes forwarded); forward
    hooks keep each supported layer's input and its output's gradient edge during a training-mode
    forward; :meth:`clipped_backward` does the rest."""

    def __init__(self, module: nn.Module, *, max_grad_norm: float, loss_reduction: str = "mean") -> None:
        super().__init__()
        self._module = module
        self.max_grad_norm, self.loss_reduction = float(max_grad_norm), loss_reduction
        self._records: list[Any] = []  # (layer, input, its version, output's gradient edge, output shape/dtype)
        self._handles, owners = [], {}
        for name, m in module.named_modules():
            params = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if not params:
                continue
            if type(m) not in LAYERS:
                raise NotImplementedError(
                    f"grad_sample_mode='ghost_bk': module {name or '(root)'} of type {type(m).__name__} has trainable "
                    f"parameters but no book-keeping rule (supported: {', '.join(sorted(c.__name__ for c in LAYERS))}; "
                    "add one with distopt.privacy.book_keeping.register_layer). Use grad_sample_mode='ghost' (Opacus' "
                    "two-pass ghost clipping) or 'hooks', or freeze its parameters")
            _check_layer(name, m)
            for p in params:
                if id(p) in owners:
                    raise NotImplementedError(f"grad_sample_mode='ghost_bk': a parameter is shared by {owners[id(p)]} "
                                              f"and {name} (tied weights); use grad_sample_mode='hooks'")
                owners[id(p)] = name
            self._handles.append(m.register_forward_hook(self._record))
        self.trainable_parameters = [p for p in module.parameters() if p.requires_grad]
        self.per_sample_gradient_norms: Tensor | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_module":
                raise
            return getattr(self._module, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._records.clear()
        return _data_parallel_inner(self._module)(*args, **kwargs)

    def _record(self, layer: nn.Module, inputs: tuple, output: Tensor) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        if any(r[0] is layer for r in self._records):
            raise NotImplementedError(f"grad_sample_mode='ghost_bk': a {type(layer).__name__} layer ran twice in one "
                                      "forward (parameter reuse); use grad_sample_mode='hooks'")
        a = inputs[0].detach()
        out = (output.shape, output.dtype, output.device)
        # the edge, not the tensor: the output's memory is not kept, and an in-place op on it later
        # (ReLU(inplace=True)) does not move the point where its gradient is read
        self._records.append((layer, a, a._version, get_gradient_edge(output), out))

    def forbid_grad_accumulation(self) -> None:
        """Opacus' hook (called with Poisson sampling); a backward here always replaces ``p.grad``."""

    def allow_grad_accumulation(self) -> None:
        """See :meth:`forbid_grad_accumulation`."""

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clipped_backward(self, loss_per_sample: Tensor, optimizer: Any) -> None:
        """One backward of ``Σ_i loss_i``, then ``p.grad = Σ_i c_i ∇loss_i`` for every trainable parameter."""
        records, self._records = self._records, []
        if not records:
            raise RuntimeError("grad_sample_mode='ghost_bk': no layer input was recorded; run the forward through the "
                               "returned module in train mode with gradients enabled before backward()")
        for layer, a, version, _, _ in records:
            if a._version != version:
                raise RuntimeError(f"grad_sample_mode='ghost_bk': the input of a {type(layer).__name__} was modified "
                                   "in place after the forward; use an out-of-place op there")
        grads = list(torch.autograd.grad(loss_per_sample.sum(), [r[3] for r in records], allow_unused=True))
        del loss_per_sample
        sqs, finishes, grams = [], [], {}
        for i, (layer, a, _, _, out) in enumerate(records):
            g = grads[i] if grads[i] is not None else torch.zeros(out[0], dtype=out[1], device=out[2])
            records[i] = grads[i] = None  # from here on the rule's closure alone holds what it needs
            rule = RULES[LAYERS[type(layer)]]
            sq, finish = rule(layer, a, g, grams) if rule is linear_rule else rule(layer, a, g)
            sqs.append(sq)
            finishes.append(finish)
            del a, g
        del grams
        norms = torch.stack([q.to(sqs[0].dtype) for q in sqs]).sum(0).clamp(min=0).sqrt()
        self.per_sample_gradient_norms = norms
        c = (self.max_grad_norm / (norms + STABILIZER)).clamp(max=1.0)
        optimizer.zero_grad(set_to_none=True)  # as Opacus' ghost backward (resets summed_grad after a real step)
        while finishes:
            for p, grad in finishes.pop(0)(c).items():  # each layer's state is freed once used
                p.grad = grad.to(p.dtype) if p.grad is None else p.grad + grad.to(p.dtype)


@functools.lru_cache(maxsize=None)
def book_keeping_engine() -> type:
    """An Opacus ``PrivacyEngine`` subclass that wraps the module in :class:`BookKeepingModule` and the
    criterion in :class:`BookKeepingLoss` (called by make_private with Opacus' ``grad_sample_mode="ghost"``)."""
    from opacus import PrivacyEngine
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping

    class BookKeepingTensor(DPTensorFastGradientClipping):
        def backward(self) -> None:  # the single pass
            self.module.clipped_backward(self.loss_per_sample, self.optimizer)

    def _keep_class(name: str) -> Callable:
        base = getattr(DPTensorFastGradientClipping, name)

        def op(self: Any, *args: Any) -> Any:
            out = base(self, *args)
            out.__class__ = type(self)
            return out
        return op

    for name in ("__truediv__", "__mul__", "__rmul__", "__add__", "__radd__", "__sub__", "__rsub__", "__neg__"):
        setattr(BookKeepingTensor, name, _keep_class(name))

    class BookKeepingLoss(DPLossFastGradientClipping):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            out = super().__call__(*args, **kwargs)
            out.__class__ = BookKeepingTensor
            return out

    class BookKeepingPrivacyEngine(PrivacyEngine):
        def _prepare_model(self, module: nn.Module, *, batch_first: bool = True, max_grad_norm: Any = 1.0,
                           loss_reduction: str = "mean", grad_sample_mode: str = "ghost",
                           wrap_model: bool = True) -> BookKeepingModule:
            from torch.distributed.fsdp import FSDPModule

            if isinstance(module, FSDPModule) or type(module).__name__.startswith("FullyShardedDataParallel"):
                raise NotImplementedError("grad_sample_mode='ghost_bk' does not support FSDP modules (their parameters "
                                          "are flat shards); use DDP or Opacus' DPDDP, or grad_sample_mode='ghost'")
            if not batch_first or not wrap_model:
                raise ValueError("grad_sample_mode='ghost_bk' needs batch_first=True and wrap_model=True")
            self.validate(module=module, optimizer=None, data_loader=None)
            return BookKeepingModule(module, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction)

        def _prepare_criterion(self, *, module: Any, optimizer: Any, criterion: Any, loss_reduction: str = "mean",
                               **kwargs: Any) -> Any:
            return BookKeepingLoss(module, optimizer, criterion, loss_reduction)

    return BookKeepingPrivacyEngine
