"""E operator: Hutchinson's estimate of the Hessian diagonal from Hessian-vector products.

    D = (1/S) Σ_s z_s ⊙ (H z_s),   E[D] = diag(H)   for probes with E[z zᵀ] = I

(Hutchinson 1989; Bekas, Kokiopoulou & Saad 2007 for the diagonal). AdaHessian (Yao et al.,
AAAI 2021) draws Rademacher probes, SophiaH (Liu et al., 2023) Gaussian ones. ``H z`` is one
double-backward pass, ``torch.autograd.grad(grads, params, grad_outputs=z)``, which needs the
gradients built by ``loss.backward(create_graph=True)`` (hence ``closure_kind = "create_graph"``).

Rules users must know:

- **Seeded probes.** The probe of the parameter at position ``j`` of its param group's
  ``params`` list, at step ``t`` (1-based) and sample ``s``, comes from
  ``torch.Generator(p.device).manual_seed(probe_seed(seed, t, j, s))``: Rademacher as
  ``2·randint(0, 2) - 1``, Gaussian as ``randn`` (drawn in float64 for float64 params, float32
  otherwise, then cast). A run is reproducible from ``seed`` and resumes exactly from a
  ``state_dict``; CPU and CUDA generators give different streams.
- **One HVP per param group.** The probe is zero outside the group, so each group gets an
  unbiased estimate of its own Hessian block's diagonal; with one group this is exactly the
  paper's estimator. Several groups cost one extra double-backward each.
- **Every ``every`` steps.** A fresh estimate is taken at steps t with (t - 1) % every == 0;
  in between the stored one is reused. The state key (``hessian``) holds
  ``β·hessian + (1 - β)·D`` (β = 0 stores D itself).
- **Conv kernels** (ndim >= 3) with ``average_conv_kernel``: D is replaced by the mean of |D|
  over the kernel's spatial dims (AdaHessian's spatial averaging, block size kh·kw).
- **Non-finite entries** of a fresh estimate are not used: the entry keeps its previous value and
  ``hessian_skipped`` (int64 tensor) counts them, so parameters never turn NaN silently.
- A gradient without a graph while others have one (a parameter entering the loss linearly)
  has a zero Hessian row: its estimate is 0. If *no* gradient has a graph, ``step`` raises.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext

_MASK = (1 << 63) - 1


def probe_seed(seed: int, step: int, index: int, sample: int = 0) -> int:
    """The generator seed of one probe: a polynomial hash of (seed, step, index, sample)."""
    return (((seed * 1_000_003 + step) * 1_000_033 + index) * 1_000_037 + sample) & _MASK


def probe_like(p: Tensor, seed: int, step: int, index: int, sample: int = 0,
               distribution: str = "rademacher") -> Tensor:
    """The seeded probe for ``p`` (same shape, dtype and device), see the module docstring."""
    gen = torch.Generator(device=p.device).manual_seed(probe_seed(seed, step, index, sample))
    draw_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    if distribution == "rademacher":
        z = torch.randint(0, 2, p.shape, generator=gen, device=p.device).to(draw_dtype).mul_(2.0).sub_(1.0)
    elif distribution == "gaussian":
        z = torch.randn(p.shape, generator=gen, device=p.device, dtype=draw_dtype)
    else:
        raise ValueError(f"unknown probe distribution {distribution!r}; use 'rademacher' or 'gaussian'")
    return z.to(p.dtype)


class HutchinsonDiagonal(Operator):
    """Store ``hessian <- β·hessian + (1-β)·D`` with D the Hutchinson diagonal; the update passes."""

    stage = Stage.E
    locality = Locality.TENSOR  # seeded whole-tensor probes; conv-kernel averaging is a reduction

    def __init__(self, seed: int, every: int = 1, samples: int = 1, distribution: str = "rademacher",
                 beta: float = 0.0, average_conv_kernel: bool = False, owner: str = "hutchinson") -> None:
        self.seed, self.every, self.samples, self.distribution = seed, every, samples, distribution
        self.beta, self.average_conv_kernel, self.owner = beta, average_conv_kernel, owner

    def init(self, param: Tensor) -> dict[str, Any]:
        return {"hessian": torch.zeros_like(param, memory_format=torch.preserve_format),
                "hessian_skipped": torch.zeros((), dtype=torch.int64, device=param.device)}

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        due = [i for i, t in enumerate(ctx.steps) if (t - 1) % self.every == 0]
        if due:
            estimates = self.estimate([ctx.params[i] for i in due], [ctx.steps[i] for i in due], ctx.group)
            for i, d in zip(due, estimates):
                self._store(ctx.states[i], d)
        return updates

    def estimate(self, params: list[Tensor], steps: list[int], group: dict[str, Any]) -> list[Tensor]:
        """D for ``params`` (one double-backward per sample), sign-flipped under ``maximize``."""
        grads = [p.grad for p in params]
        live = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        if not live:
            raise RuntimeError(
                f"{self.owner}: the gradients carry no autograd graph, so no Hessian-vector product can be "
                "taken. Build them with loss.backward(create_graph=True) (a closure passed to step() must "
                "do the same), and free the graph afterwards with optimizer.zero_grad(set_to_none=True); in a "
                "transformers Trainer, use distopt.integrations.hf.CurvatureTrainer."
            )
        position = {id(p): j for j, p in enumerate(group["params"])}
        out = [torch.zeros_like(p) for p in params]
        for s in range(self.samples):
            zs = [probe_like(p, self.seed, t, position[id(p)], s, self.distribution) for p, t in zip(params, steps)]
            hzs = torch.autograd.grad([grads[k] for k in live], params, grad_outputs=[zs[k] for k in live],
                                      retain_graph=True, allow_unused=True)
            for d, z, hz in zip(out, zs, hzs):
                if hz is not None:
                    d.addcmul_(z, hz.detach(), value=1.0 / self.samples)
        if group.get("maximize"):
            out = [d.neg_() for d in out]
        if self.average_conv_kernel:
            out = [d.abs().mean(dim=tuple(range(2, d.ndim)), keepdim=True).expand_as(d) if d.ndim >= 3 else d
                   for d in out]
        return out

    def _store(self, state: dict[str, Any], d: Tensor) -> None:
        buf = state["hessian"]
        finite = torch.isfinite(d)
        state["hessian_skipped"].add_((~finite).sum().to(state["hessian_skipped"].device))
        d = torch.where(finite, d, buf)
        if self.beta == 0.0:
            buf.copy_(d)
        else:
            buf.lerp_(d, 1.0 - self.beta)
