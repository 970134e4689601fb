"""Run by tests/privacy/test_ddp.py under ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU).

Each rank holds half of a global batch of 8; make_private on a DPDDP- (hooks, ghost_bk_dpddp) or DDP-
(ghost, ghost_bk) wrapped module picks Opacus' Distributed*DPOptimizer. Rank 0 also computes the single-process
reference on the whole batch and writes everything to ``argv[1]`` (a torch file)."""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import distopt  # noqa: E402
from distopt.privacy import make_private, make_private_zo  # noqa: E402
from privacy_helpers import data, mlp  # noqa: E402

warnings.filterwarnings("ignore")
C, N, GLOBAL_BATCH = 2.0, 16, 8


def step(module, optimizer, x, y, criterion=None):
    optimizer.zero_grad()
    out = module(x)
    (criterion(out, y) if criterion is not None else nn.functional.cross_entropy(out, y)).backward()
    optimizer.step()


def private_run(mode: str, sigma: float, distributed: bool, hidden: int = 10, seed: int = 3):
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    x, y = data(N)
    model = mlp(hidden=hidden)
    opt = distopt.create("adamw", model.parameters(), lr=1e-2)
    dataset = TensorDataset(x, y)
    if distributed:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        module = DPDDP(model) if mode in ("hooks", "ghost_bk_dpddp") else DDP(model)
        dl = DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=DistributedSampler(dataset, shuffle=False))
    else:
        module, dl = model, DataLoader(dataset, batch_size=GLOBAL_BATCH)
    out = make_private(module, opt, dl, noise_multiplier=sigma, max_grad_norm=C, grad_sample_mode=mode.split("_dp")[0],
                       poisson_sampling=False, noise_generator=torch.Generator().manual_seed(seed + rank))
    module, dp_opt, criterion = out[0], out[1], (out[2] if mode != "hooks" else None)
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    step(module, dp_opt, x[:GLOBAL_BATCH][local], y[:GLOBAL_BATCH][local], criterion)
    return {"grads": [p.grad.detach().clone() for p in model.parameters()],
            "params": [p.detach().clone() for p in model.parameters()],
            "class": type(dp_opt).__name__, "eps": dp_opt.privacy_spent()[0],
            "expected_batch_size": float(dp_opt.expected_batch_size)}


def fsdp_refusal() -> str:
    """make_private(grad_sample_mode="ghost_bk") on an FSDP2 module: the error it raises."""
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model)
    x, y = data(N)
    try:
        make_private(model, distopt.create("sgd", model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), 4),
                     noise_multiplier=1.0, max_grad_norm=C, grad_sample_mode="ghost_bk")
    except NotImplementedError as error:
        return str(error)
    return "no error"


def zo_run(sigma: float, distributed: bool):
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    x, y = data(N)
    model = mlp()
    dataset = TensorDataset(x, y)
    dl = (DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=DistributedSampler(dataset, shuffle=False))
          if distributed else DataLoader(dataset, batch_size=GLOBAL_BATCH))
    _, dp_opt, _ = make_private_zo(model, distopt.create("sgd", model.parameters(), lr=0.1), dl,
                                   noise_multiplier=sigma, max_grad_norm=1.0, poisson_sampling=False,
                                   distributed=distributed, noise_generator=torch.Generator().manual_seed(11 + rank))
    local = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    xb, yb = x[:GLOBAL_BATCH][local], y[:GLOBAL_BATCH][local]
    dp_opt.step(lambda: nn.functional.cross_entropy(model(xb), yb, reduction="none"))
    return {"scalar": dp_opt.projected_grad, "params": [p.detach().clone() for p in model.parameters()]}


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {
        "hooks": private_run("hooks", 0.0, True),
        "ghost": private_run("ghost", 0.0, True),
        "noisy_clean": private_run("hooks", 0.0, True, hidden=600),
        "noisy": private_run("hooks", 1.0, True, hidden=600),
        "ghost_bk": private_run("ghost_bk", 0.0, True),
        "ghost_bk_dpddp": private_run("ghost_bk_dpddp", 0.0, True),
        "ghost_bk_noisy_clean": private_run("ghost_bk", 0.0, True, hidden=600),
        "ghost_bk_noisy": private_run("ghost_bk", 1.0, True, hidden=600),
        "fsdp_ghost_bk": fsdp_refusal(),
        "zo": zo_run(0.0, True),
        "zo_noisy": zo_run(1.0, True),
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if rank == 0:
        reference = {"hooks": private_run("hooks", 0.0, False), "ghost": private_run("ghost", 0.0, False),
                     "ghost_bk": private_run("ghost_bk", 0.0, False),
                     "zo": zo_run(0.0, False)}
        torch.save({"ranks": everyone, "single": reference}, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
