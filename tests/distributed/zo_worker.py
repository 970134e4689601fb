"""torchrun worker for tests/distributed/test_zo_distributed.py (also runnable by hand):

    torchrun --standalone --nproc_per_node 2 tests/distributed/zo_worker.py --mode dp --out /tmp/dp.pt
    torchrun --standalone --nproc_per_node 2 tests/distributed/zo_worker.py --mode fsdp --out /tmp/fsdp.pt
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/zo_worker.py --mode zero3 --out z3.pt

``--mode dp`` (float64): each rank trains on its own half of every batch; the zeroth-order recipes
average their scalars over the process group (and nothing else). ``--mode fsdp`` (float32) shards
the model with FSDP2 ``fully_shard`` (params are DTensor Shard(0), uneven rows; every rank sees the
whole batch); the optimizer perturbs local shards in place with directions from global element
offsets. ``--mode zero3`` (float32) does the same under DeepSpeed ZeRO-3 (flat partitions,
``p.ds_tensor``, persistence threshold 0). ``build``/``batch``/``train`` are shared
with the single-process reference in the test.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

import distopt

BATCH = 16
NAMES = {"dp": ["zo_sgd", "zo_sgd_cons"], "fsdp": ["zo_sgd", "hizoo", "lozo", "sparse_mezo"],
         "zero3": ["zo_sgd", "hizoo", "sparse_mezo"]}
HPARAMS: dict[str, dict[str, Any]] = {
    "zo_sgd": {"lr": 2e-2, "n": 2, "weight_decay": 0.01},
    "zo_sgd_cons": {"lr": 2e-2},
    "hizoo": {"lr": 2e-2, "hessian_smooth": 1e-2},
    "lozo": {"lr": 2e-2, "rank": 2, "interval": 5},
    "sparse_mezo": {"lr": 2e-2, "sparsity": 0.5},
}


def build(dtype: torch.dtype) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3)).to(dtype)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 7, generator=g).to(dtype), torch.randn(BATCH, 3, generator=g).to(dtype)


def train(net: torch.nn.Module, name: str, steps: int, dtype: torch.dtype, rank: int = 0, world: int = 1,
          **kwargs: Any) -> Any:
    """``world`` ranks each take their ``1/world`` of every batch (``world=1``: the whole batch)."""
    opt = distopt.create(name, net.parameters(), **HPARAMS[name], **kwargs)
    per = BATCH // world
    for t in range(steps):
        x, y = batch(t, dtype)
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        opt.step(lambda: torch.nn.functional.mse_loss(net(x), y))
    return opt


def main() -> None:
    import torch.distributed as dist

    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("dp", "fsdp", "zero3"), required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float64 if args.mode == "dp" else torch.float32
    if args.mode == "zero3":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = {}
    for name in NAMES[args.mode]:
        model = build(dtype)
        if args.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in list(model)[:-1]:   # the last Linear stays in the root's group: FSDP2 keeps the
                if isinstance(layer, torch.nn.Linear):   # root's gathered params after a no_grad forward,
                    fully_shard(layer, mesh=mesh)    # which the optimizer handles (model=): reshard()
            fully_shard(model, mesh=mesh)
            # every rank sees the whole batch: sharding alone must not change the trajectory (split
            # batches in float32 would add the float32 finite-difference noise of a different loss sum)
            opt = train(model, name, args.steps, dtype, process_group=True, model=model)
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())
            local_rows = [p._local_tensor.shape[0] for p in model.parameters()]
            params = [p.full_tensor().detach().clone() for p in model.parameters()]
        elif args.mode == "zero3":
            import deepspeed

            cfg = {"train_batch_size": world,
                   "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
            engine, *_ = deepspeed.initialize(model=model, config=cfg, model_parameters=model.parameters())
            opt = train(engine, name, args.steps, dtype, process_group=True)
            opt_params = [p for g in opt.param_groups for p in g["params"]]
            assert all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in opt_params)
            local_rows = [p.ds_tensor.numel() for p in opt_params]
            with deepspeed.zero.GatheredParameters(opt_params):
                params = [p.detach().clone() for p in opt_params]
        else:
            opt = train(model, name, args.steps, dtype, rank, world, process_group=True)
            local_rows = []
            params = [p.detach().clone() for p in model.parameters()]
        agree = distopt.zo.ranks_agree(params)
        results[name] = {"params": params, "bytes": opt.comm.bytes, "calls": opt.comm.calls, "agree": agree,
                         "local_rows": local_rows}
    if rank == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import distopt.zo  # noqa: F401

    main()
