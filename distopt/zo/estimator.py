"""E operators of the zeroth-order family: SPSA-style estimates regenerated from a seed.

    g = (1/n) Σ_k c_k d_k,    c_k = (f(θ + ε d_k) - f(θ - ε d_k)) / (2ε)   (two-sided)
                              c_k = (f(θ + ε d_k) - f(θ)) / ε               (one-sided)

Spall, "Multivariate stochastic approximation using a simultaneous perturbation gradient
approximation", IEEE TAC 1992; Malladi et al., "Fine-Tuning Language Models with Just Forward
Passes" (MeZO), NeurIPS 2023. ``d_k`` is a direction regenerated from ``(seed, step, k)`` and
global element indices (:mod:`distopt.zo.perturb`), never stored.

An estimator plays two roles: the optimizer asks it for *directions* (to perturb parameters
while the closure runs) and for the *scalars* (linear in the losses, so data-parallel ranks can
average them); then, as the first operator of the recipe's chain, its :meth:`update` expands
``g`` for one block of rows at a time and hands it to the ordinary T/Φ/P operators
(weight decay, momentum, Adam moments, ``ApplyLR``). The optimizer runs the chain block by block,
so no full-size ``z`` or ``g`` ever exists (elementwise chains are exact on any slice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.zo.layout import Slot, compute_dtype, is_zero3
from distopt.zo.perturb import derive_key, generate

# stream tags mixed into keys so that different uses of one (seed, step, k) never share counters
TAG_Z, TAG_U, TAG_V = 0, 1, 2


@dataclass
class Probe:
    """One step's randomness and results: everything needed to regenerate and apply it."""

    seed: int
    step: int
    n: int
    eps: float
    two_sided: bool
    distribution: str
    scalars: list[float] = field(default_factory=list)
    cache: dict[Any, Tensor] = field(default_factory=dict, repr=False)

    def key(self, k: int, *tags: int) -> int:
        return derive_key(self.seed, self.step, k, *tags)


@dataclass
class Losses:
    """Loss values of one step: f(θ) (when evaluated), f(θ + ε d_k), f(θ - ε d_k) (two-sided)."""

    center: float | None
    plus: list[float]
    minus: list[float] | None


@dataclass
class ZOContext(StepContext):
    """A :class:`StepContext` for one bucket of row blocks: ``params[i]`` are rows ``rows[i]``
    (local) of ``slots[i]``, as ``len(rows) x cols`` views; ``states[i]`` are the matching views."""

    probe: Probe = None  # type: ignore[assignment]
    slots: list[Slot] = field(default_factory=list)
    rows: list[slice] = field(default_factory=list)


class ZOEstimate(Operator):
    """Gaussian or Rademacher directions ``d = z`` (MeZO / ZO-SGD)."""

    stage = Stage.E
    locality = Locality.ELEMENTWISE
    #: rows of a parameter can be estimated independently (chunking by rows is exact)
    row_separable = True
    #: the step also evaluates f(θ) when two-sided (HiZOO's curvature, conservative steps)
    needs_center = False

    def __init__(self, maximize: bool = False) -> None:
        self.maximize = maximize

    # -- directions -------------------------------------------------------------------------
    def z(self, probe: Probe, slot: Slot, k: int, rows: slice | Tensor, dtype: torch.dtype) -> Tensor:
        z = generate(probe.key(k, TAG_Z), slot.base, slot.cols, slot.global_rows(rows), probe.distribution,
                     device=slot.local.device)
        return z if dtype == torch.float32 else z.to(dtype)

    def direction(self, probe: Probe, slot: Slot, k: int, rows: slice | Tensor, theta: Tensor,
                  state: dict[str, Any]) -> Tensor:
        """``d_k`` for ``rows`` (local) of ``slot``, in the compute dtype; ``theta`` and ``state``
        are the unperturbed values of those rows."""
        return self.z(probe, slot, k, rows, compute_dtype(theta.dtype))

    # -- scalars ----------------------------------------------------------------------------
    def scalars(self, probe: Probe, losses: Losses) -> list[float]:
        """Values linear in the losses (averaged across data-parallel ranks): the c_k."""
        if probe.two_sided:
            assert losses.minus is not None
            return [(p - m) / (2.0 * probe.eps) for p, m in zip(losses.plus, losses.minus)]
        assert losses.center is not None
        return [(p - losses.center) / probe.eps for p in losses.plus]

    def coefficients(self, probe: Probe) -> list[float]:
        sign = -1.0 if self.maximize else 1.0
        return [sign * c / probe.n for c in probe.scalars[: probe.n]]

    def prepare(self, slots: list[Slot], states: list[dict[str, Any]], probe: Probe, process_group: Any) -> None:
        """Per-step set-up before any direction is generated (e.g. thresholds)."""

    # -- the E stage --------------------------------------------------------------------------
    def estimate(self, probe: Probe, slot: Slot, rows: slice, theta: Tensor, state: dict[str, Any]) -> Tensor:
        g: Tensor | None = None
        for k, c in enumerate(self.coefficients(probe)):
            d = self.direction(probe, slot, k, rows, theta, state).mul_(c)
            g = d if g is None else g.add_(d)
        assert g is not None
        return g if g.dtype == theta.dtype else g.to(theta.dtype)

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        assert isinstance(ctx, ZOContext), "zeroth-order estimators run inside a ZOOptimizer step"
        return [self.estimate(ctx.probe, slot, rows, theta, state)
                for slot, rows, theta, state in zip(ctx.slots, ctx.rows, ctx.params, ctx.states)]


class HessianZOEstimate(ZOEstimate):
    """HiZOO: directions scaled by a diagonal Hessian estimate H (state ``hessian``, H_0 = 1).

        d_k = z_k / sqrt(H_t)
        H_{t+1} = (1 - α) H_t + α (1/n) Σ_k |f(θ+εd_k) + f(θ-εd_k) - 2 f(θ)| / (2ε²) · H_t z_k²
        g = (1/n) Σ_k c_k z_k / sqrt(H_{t+1})

    Zhao et al., "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed Zeroth-Order
    Optimizer" (HiZOO), ICLR 2025, Algorithm 1 and the authors' code (``zo_Hessian_step_update``).
    For n > 1 the n curvature terms and gradient terms are averaged (the paper uses n = 1)."""

    needs_center = True

    def __init__(self, smooth: float, maximize: bool = False) -> None:
        super().__init__(maximize)
        self.smooth = smooth

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"hessian": torch.ones_like(param, memory_format=torch.contiguous_format)}

    def direction(self, probe: Probe, slot: Slot, k: int, rows: slice | Tensor, theta: Tensor,
                  state: dict[str, Any]) -> Tensor:
        z = self.z(probe, slot, k, rows, compute_dtype(theta.dtype))
        return z.div_(state["hessian"].to(z.dtype).sqrt())

    def scalars(self, probe: Probe, losses: Losses) -> list[float]:
        if not probe.two_sided or losses.center is None or losses.minus is None:
            raise ValueError("hizoo needs f(θ+εz), f(θ) and f(θ-εz): two_sided must be True")
        grads = [(p - m) / (2.0 * probe.eps) for p, m in zip(losses.plus, losses.minus)]
        curv = [(p + m - 2.0 * losses.center) / (2.0 * probe.eps**2) for p, m in zip(losses.plus, losses.minus)]
        return grads + curv

    def estimate(self, probe: Probe, slot: Slot, rows: slice, theta: Tensor, state: dict[str, Any]) -> Tensor:
        hessian = state["hessian"]
        dtype = compute_dtype(theta.dtype)
        h_old = hessian.to(dtype)
        curv = probe.scalars[probe.n: 2 * probe.n]
        acc_h: Tensor | None = None
        acc_g: Tensor | None = None
        for k, c in enumerate(self.coefficients(probe)):
            z = self.z(probe, slot, k, rows, dtype)
            hz = (z * z).mul_(h_old).mul_(abs(curv[k]) / probe.n)
            acc_h = hz if acc_h is None else acc_h.add_(hz)
            z.mul_(c)
            acc_g = z if acc_g is None else acc_g.add_(z)
        assert acc_h is not None and acc_g is not None
        h_new = h_old.mul_(1.0 - self.smooth).add_(acc_h.mul_(self.smooth))
        hessian.copy_(h_new)
        g = acc_g.div_(hessian.to(dtype).sqrt())
        return g if g.dtype == theta.dtype else g.to(theta.dtype)


class LowRankZOEstimate(ZOEstimate):
    """LOZO: for a matrix parameter (2-D or more, seen as shape[0] x rest) the direction is low
    rank, ``d_k = U_k V_kᵀ`` with U_k (rows x r) drawn every step and V_k (cols x r) drawn every
    ``interval`` steps (lazy sampling); vectors use ordinary ``z``.

    Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
    Structures" (LOZO), ICLR 2025, Algorithm 1 (``lowrank_zo_perturb_parameters`` in the code).
    U and V are regenerated from counters (U by global row, so a Shard(0) shard regenerates its
    rows), and U Vᵀ is formed as Σ_j U[:, j] V[:, j]ᵀ with one kernel per operation (bit-exact
    under any row chunking)."""

    locality = Locality.MATRIX

    def __init__(self, rank: int, interval: int, maximize: bool = False) -> None:
        super().__init__(maximize)
        self.rank, self.interval = rank, interval

    def direction(self, probe: Probe, slot: Slot, k: int, rows: slice | Tensor, theta: Tensor,
                  state: dict[str, Any]) -> Tensor:
        dtype = compute_dtype(theta.dtype)
        if len(slot.global_shape) < 2:
            return self.z(probe, slot, k, rows, dtype)
        if is_zero3(slot.param):
            raise NotImplementedError("lozo: DeepSpeed ZeRO-3 partitions are flat slices that cut matrix rows; "
                                      "use FSDP2 (Shard(0) keeps whole rows) or ZeRO stage 0-2")
        device = slot.local.device
        epoch = (probe.step - 1) // self.interval
        vkey = ("V", slot.index, k, epoch)
        v = probe.cache.get(vkey)
        if v is None:
            v = generate(derive_key(probe.seed, epoch, k, TAG_V, slot.index), 0, self.rank, slice(0, slot.cols),
                         probe.distribution, device=device).to(dtype).t().contiguous()   # r x cols
            probe.cache[vkey] = v
        u = generate(probe.key(k, TAG_U, slot.index), 0, self.rank, slot.global_rows(rows), probe.distribution,
                     device=device).to(dtype)                                             # rows x r
        out = u[:, 0:1] * v[0:1]
        for j in range(1, self.rank):
            out.add_(u[:, j:j + 1] * v[j:j + 1])
        return out


def _bits_dtype(dtype: torch.dtype) -> torch.dtype:
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[torch.empty((), dtype=dtype).element_size()]


def kth_smallest_abs(slot: Slot, k: int, chunk: int) -> float:
    """The k-th smallest |θ| (1-based) over the whole (possibly sharded) parameter, exactly.

    Bisection over the bit patterns of |θ| (ordered like the values for non-negative floats):
    one counting pass per bit, chunked by rows; a sharded parameter all-reduces its counts over
    the mesh dimensions it is sharded on."""
    local = slot.matrix
    idt = _bits_dtype(local.dtype)

    def count_le(mid: int) -> int:
        total = torch.zeros((), dtype=torch.int64, device=local.device)
        for rows in slot.blocks(chunk):
            total += (local[rows].abs().view(idt) <= mid).sum()
        _reduce_over_shards(slot, total, "sum")
        return int(total)

    high = torch.zeros((), dtype=torch.int64, device=local.device)
    for rows in slot.blocks(chunk):
        if local[rows].numel():
            high = torch.maximum(high, local[rows].abs().view(idt).max().to(torch.int64))
    _reduce_over_shards(slot, high, "max")
    lo, hi = 0, int(high)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_le(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=idt).view(local.dtype).item())


def _reduce_over_shards(slot: Slot, t: Tensor, op: str) -> None:
    if not slot.sharded:
        return
    import torch.distributed as dist

    p = slot.param
    if is_zero3(p):
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=getattr(p, "ds_process_group", None))
        return
    from torch.distributed.tensor import Shard

    for dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                            group=p.device_mesh.get_group(dim))


class MaskedZOEstimate(ZOEstimate):
    """Sparse-MeZO: perturb and update only small-magnitude entries, ``d_k = m ⊙ z_k`` with
    ``m = 1[|θ| <= h]``; h (state ``mask_threshold``) is set per tensor at the first step to the
    ``ceil((1 - sparsity) N)``-th smallest |θ| and kept; the mask is recomputed from the current
    θ at every step, never stored.

    Liu et al., "Sparse MeZO: Less Parameters for Better Performance in Zeroth-Order LLM
    Fine-Tuning", 2024 (arXiv:2402.15751), Section 3 (magnitude-based mask, memory-efficient
    dynamic mask computed in the forward pass)."""

    def __init__(self, sparsity: float, chunk: int = 1 << 16, maximize: bool = False) -> None:
        super().__init__(maximize)
        self.sparsity, self.chunk = sparsity, chunk

    def init(self, param: Tensor) -> dict[str, Tensor]:
        return {"mask_threshold": torch.tensor(math.nan, dtype=torch.float64)}

    def prepare(self, slots: list[Slot], states: list[dict[str, Any]], probe: Probe, process_group: Any) -> None:
        for slot, state in zip(slots, states):
            if math.isnan(float(state["mask_threshold"])):
                numel = math.prod(slot.global_shape)
                k = max(1, math.ceil((1.0 - self.sparsity) * numel))
                state["mask_threshold"].fill_(kth_smallest_abs(slot, k, self.chunk))

    def direction(self, probe: Probe, slot: Slot, k: int, rows: slice | Tensor, theta: Tensor,
                  state: dict[str, Any]) -> Tensor:
        z = self.z(probe, slot, k, rows, compute_dtype(theta.dtype))
        return z.mul_(theta.abs() <= float(state["mask_threshold"]))


__all__ = ["HessianZOEstimate", "Losses", "LowRankZOEstimate", "MaskedZOEstimate", "Probe", "ZOContext",
           "ZOEstimate", "kth_smallest_abs"]
