"""Data-parallel training with any distopt optimizer under torchrun (DDP, gloo on CPU or NCCL on GPU).

    torchrun --nproc_per_node 2 examples/ddp_train.py --optimizer lamb --out final.pt

Each rank sees its own slice of every global batch; DDP averages gradients, and the
optimizer steps identically on every rank, so the result equals one process that sees the
whole batch. ``--out`` saves rank 0's final parameters (the test compares them with a
single-process run). Partitioned optimizer state (ZeRO) is ``distopt.distributed``'s job.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import distopt


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)).double()


def batches(steps: int, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(batch, 12, generator=g, dtype=torch.float64),
             torch.randn(batch, 3, generator=g, dtype=torch.float64)) for _ in range(steps)]


def train(model: torch.nn.Module, optimizer: str, lr: float, steps: int, rank: int = 0, world: int = 1) -> None:
    opt = distopt.create(optimizer, model.parameters(), lr=lr)
    for x, y in batches(steps):
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[shard]), y[shard]).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    model = build()
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    train(wrapped, args.optimizer, args.lr, args.steps, rank, world)
    if args.out and rank == 0:
        torch.save([p.detach() for p in model.parameters()], args.out)
    if distributed:
        dist.barrier()  # let every rank finish its collectives before gloo tears the group down
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
