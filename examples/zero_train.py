"""DDP training with ZeRO-partitioned optimizer state (any distopt recipe) and a resharding
distributed checkpoint.

    torchrun --standalone --nproc_per_node 2 examples/zero_train.py --optimizer muon --ckpt /tmp/run
    torchrun --standalone --nproc_per_node 3 examples/zero_train.py --optimizer muon --ckpt /tmp/run --resume
    launchers/deepspeed.sh examples/zero_train.py --optimizer adamw      (the deepspeed launcher, plain DDP)

Each rank keeps ~1/N of the optimizer state (``ZeroOptimizer``); DDP averages gradients; the
owners update their part and the params are gathered back. ``--ckpt`` saves with
``torch.distributed.checkpoint`` at the end; ``--resume`` loads it on any number of ranks.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import distopt
from distopt.distributed import checkpoint
from distopt.distributed.zero import ZeroOptimizer


def build(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                               torch.nn.Linear(64, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else None
    model = build().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = ZeroOptimizer(distopt.create(args.optimizer, model.parameters(), lr=args.lr), named_parameters=model)
    if args.resume and args.ckpt:
        header = checkpoint.load(args.ckpt, opt, model=model)
        if rank == 0:
            print(f"resumed a checkpoint saved on {header['world_size']} rank(s) onto {world}")
    gen = torch.Generator().manual_seed(1234 + rank)
    for step in range(args.steps):
        x = torch.randn(args.batch // world, 32, generator=gen).to(device)
        y = x[:, :4].sin().to(device)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        if rank == 0 and step % 10 == 0:
            print(f"step {step:3d} loss {loss.item():.4f} state bytes on rank 0: {distopt.state_bytes(opt)}")
    if args.ckpt:
        checkpoint.save(args.ckpt, opt, model=model)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
