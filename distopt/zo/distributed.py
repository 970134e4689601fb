"""Data-parallel zeroth-order training: ranks share the seed and all-reduce only the scalars.

Every rank regenerates the same directions from the shared ``(seed, step)``, evaluates its own
batch, and the ``n`` projected-gradient scalars (float64) are averaged with one all-reduce:
``8·n`` bytes a step whatever the model size, and no gradient all-reduce. For a loss that is the
mean over the batch and equal per-rank batch sizes, the average of per-rank scalars is the
scalar of the union of the batches (the finite difference is linear in the loss). Every rank
then applies the same update to the same parameters, so they stay bit-identical.

Pass ``process_group=`` to any zeroth-order recipe (a ``ProcessGroup``, or ``True`` for the
default group). :class:`CommCounter` counts the bytes each optimizer sends through its own
collective calls (``optimizer.comm``). Other scalar counts: hizoo 2n (the curvature terms),
zo_sgd_cons n + 3 (the three candidate losses, so every rank takes the same decision).

Through the usual wrappers (tests/distributed/test_zo_data_parallel.py, 2 CPU ranks, the profiler's
record of every collective shows only the scalar all-reduces): DDP (the closure calls the
``DistributedDataParallel`` module under ``no_grad``, so its reducer never runs); Accelerate
(``accelerator.prepare(model, opt, loader)``: ``AcceleratedOptimizer.step(closure)`` forwards the
closure, the prepared loader gives each rank its shard); DeepSpeed through
``distopt.integrations.deepspeed.initialize(model=..., optimizer=opt, config=...)`` (ZeRO stage 0,
or 3; the engine gets no optimizer and the recipe averages over the engine's data-parallel group;
stages 1/2 are refused); the Hugging Face :class:`distopt.zo.hf.ZOTrainer` under torchrun.

Sharded parameters work the same way, every rank perturbing and updating only what it holds,
with directions keyed by global element offsets: FSDP2 (``fully_shard``; DTensor ``Shard(0)``;
pass ``model=`` the root so it is resharded between perturbed forwards) and DeepSpeed ZeRO-3
(flat ``p.ds_tensor`` partitions; ``stage3_param_persistence_threshold: 0``; LOZO refused). The
trajectory equals the unsharded run (tests/distributed/test_zo_distributed.py: bit-exact on 2
CPU ranks). Sparse-MeZO's one-time thresholds on sharded parameters all-reduce one count per
bisection step (at most 64 per tensor, first step only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class CommCounter:
    """Bytes and calls of the collectives an optimizer issued (payload per rank)."""

    bytes: int = 0
    calls: int = 0

    def all_reduce_mean(self, values: list[float], group: Any, device: torch.device) -> list[float]:
        import torch.distributed as dist

        pg = None if group is True else group
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=pg)
        t /= dist.get_world_size(pg)
        self.bytes += t.numel() * t.element_size()
        self.calls += 1
        return t.tolist()


def DataParallelZO(params: Any, name: str = "zo_sgd", process_group: Any = True, **hparams: Any) -> Any:  # noqa: N802
    """A zeroth-order recipe that averages its scalars over ``process_group`` (default: WORLD):
    ``DataParallelZO(model.parameters(), "zo_sgd", lr=1e-6)``."""
    import distopt

    return distopt.create(name, params, process_group=process_group, **hparams)


def ranks_agree(tensors: list[Tensor], group: Any = None) -> bool:
    """True when every rank holds bit-identical ``tensors`` (compares a checksum of the bytes)."""
    import torch.distributed as dist

    digest = torch.zeros(2, dtype=torch.float64)
    for t in tensors:
        b = t.detach().reshape(-1).contiguous().view(torch.uint8).to(torch.float64).cpu()
        digest[0] += b.sum()
        digest[1] += (b * torch.arange(1, b.numel() + 1, dtype=torch.float64).remainder_(9973)).sum()
    lo, hi = digest.clone(), digest.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(lo, hi))


__all__ = ["CommCounter", "DataParallelZO", "ranks_agree"]
