"""Worker for tests/distributed/test_accelerate.py: ``accelerator.prepare(model, optimizer,
dataloader)`` with a distopt optimizer, 2 CPU processes, one launch per backend, every recipe of
RECIPES (unregistered ones reported as skipped):

    accelerate launch --config_file launchers/accelerate/multi_cpu_ddp.yaml --multi_gpu --num_processes 2 \
        accelerate_worker.py ddp --out r.json
    accelerate launch --config_file launchers/accelerate/fsdp2.yaml --num_processes 2 --mixed_precision no \
        --fsdp_transformer_layer_cls_to_wrap Block ... accelerate_worker.py fsdp2 --out r.json
    DS_ACCELERATOR=cpu accelerate launch --config_file launchers/accelerate/deepspeed_zero2.yaml \
        --num_processes 2 --mixed_precision no accelerate_worker.py deepspeed --out r.json

The test (test_accelerate.py) builds these commands; see its docstring for what each flag is for.

What is checked: each rank gets its own slice of every global batch from the *prepared*
dataloader (Accelerate's sharding), the backend reduces the gradients, the gradient is clipped to
norm CLIP (Accelerate's ``clip_grad_norm_``; under DeepSpeed the engine clips with the config's
``gradient_clipping``), the optimizer steps; after STEPS steps the full parameters must equal a
single-process run on the whole batch (computed on rank 0 and broadcast) to 1e-5 relative (fp32).

How a distopt optimizer goes through each backend:

- ``ddp``: as is (``distopt.create(...)``), and also wrapped in
  :class:`distopt.distributed.zero.ZeroOptimizer` *before* ``prepare`` (ZeRO-1 partitioned state);
- ``fsdp2`` (``fsdp_version: 2``): as is. Accelerate's FSDP2 path swaps the optimizer's params
  for the ``fully_shard`` DTensors in place; distopt creates its state lazily at the first step
  and its step hook delegates DTensor params to :mod:`distopt.distributed.fsdp` (owner protocol
  for tensor/matrix recipes);
- ``deepspeed`` (Accelerate's DeepSpeed plugin, ZeRO 1/2/3): pass
  ``distopt.integrations.deepspeed.wrap(opt, model)`` to ``prepare`` instead of ``opt``.
  Accelerate calls ``deepspeed.initialize`` itself, so distopt's ``initialize`` cannot be used;
  ``wrap`` returns the same adapter that ``initialize`` would hand to DeepSpeed, which recovers
  the param -> flat-partition layout from the engine at the first step and runs tensor/matrix
  recipes on whole parameters (elementwise ones on the fragments). Without ``wrap``, AdamW-like
  (elementwise) recipes are exact anyway, and tensor/matrix recipes raise at the first step
  (checked here as ``refuse``) instead of updating wrongly.

CPU-only workarounds (Accelerate 1.15, not needed on GPUs): the process group backend is set to
gloo with ``InitProcessGroupKwargs(backend="gloo")`` (without a GPU Accelerate picks no backend
unless ``cpu=True``, and ``cpu=True`` turns its DeepSpeed and FSDP plugins off). For
``fsdp2``, Accelerate enables its FSDP plugin only when the process state is a GPU-like
distributed type (``AcceleratorState``: FSDP is set only for MULTI_GPU/XPU/NPU/...; a CPU-only
machine is MULTI_CPU or NO), so the worker marks the ``PartialState`` as MULTI_GPU before
creating the Accelerator (device stays CPU). Nothing else is patched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distopt

STEPS = 6
MICRO = 8  # samples per process per step
CLIP = 1.0  # matches gradient_clipping: 1.0 of launchers/accelerate/deepspeed_zero*.yaml (read back below)
RECIPES = ["adamw", "muon", "lamb", "shampoo"]
OPTIONAL = {"shampoo"}
HPARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adamw": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    # fp32 Newton-Schulz: the reduced gradient differs from the one-process gradient by fp32
    # rounding (mean of per-rank means); bf16 iterations would turn that into bf16-sized steps
    "muon": ({"lr": 2e-2, "weight_decay": 0.1, "ns_dtype": torch.float32},
             {"lr": 1e-2, "use_muon": False, "adamw_weight_decay": 0.01}),
    "lamb": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    # epsilon 1e-4, not the default 1e-12: a 16-sample gradient of a 37x21 matrix has rank <= 16, and
    # with a tiny epsilon the inverse root amplifies the null space, where the only signal is fp32
    # rounding: one process on the whole batch vs the mean of two half-batch means already differ by
    # 0.16 relative after 6 steps with no distribution at all (2e-6 with epsilon 1e-4). SOAP is left
    # out for the same reason (its eigenbasis of a rank-deficient statistic is not unique: 0.2).
    "shampoo": ({"lr": 1e-2, "precondition_frequency": 2, "epsilon": 1e-4}, {"lr": 3e-3}),
}


class Block(torch.nn.Module):
    """A residual MLP block: the unit FSDP2 shards (``fsdp_transformer_layer_cls_to_wrap Block``).
    Odd sizes: 37 and 21 rows split unevenly over 2 ranks."""

    def __init__(self, d: int = 21, h: int = 37) -> None:
        super().__init__()
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(12, 21)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(21, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def groups(model: torch.nn.Module, name: str) -> list[dict[str, Any]]:
    """Matrices and vectors in two groups with different hyperparameters."""
    g0, g1 = HPARAMS[name]
    mats = [p for p in model.parameters() if p.ndim >= 2]
    vecs = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": mats, **g0}, {"params": vecs, **g1}]


def dataset(world: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(7)
    n = STEPS * MICRO * world
    x = torch.randn(n, 12, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randn(n, 5, generator=g) + x[:, :5])


def loss_of(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def flat(params: Any) -> torch.Tensor:
    return torch.cat([full(p).reshape(-1).float() for p in params])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())


def reference(name: str, world: int, clip: float) -> torch.Tensor:
    """One process, the whole global batch (MICRO x world) per step; rank 0, broadcast."""
    if dist.get_rank() == 0:
        model = build()
        opt = distopt.create(name, groups(model, name))
        loader = torch.utils.data.DataLoader(dataset(world), batch_size=MICRO * world, shuffle=False)
        for x, y in loader:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        ref = flat(model.parameters())
    else:
        ref = torch.empty_like(flat(build().parameters()))
    dist.broadcast(ref, 0)
    return ref


def recipes() -> list[str]:
    return [n for n in RECIPES if n in distopt.available()]


def skipped() -> dict[str, str]:
    return {n: f"{n!r} is not registered (distopt.available())" for n in RECIPES if n not in distopt.available()}


# ----------------------------------------------------------------------------- accelerate
def make_accelerator(mode: str) -> Any:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    pg = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=120))
    if mode == "ddp":
        return Accelerator(cpu=True, kwargs_handlers=[pg])
    if mode == "fsdp2" and not torch.cuda.is_available():
        # CPU only: Accelerate turns FSDP on only for GPU-like distributed types (module docstring)
        state = PartialState(backend="gloo", timeout=pg.timeout)
        state.distributed_type = DistributedType.MULTI_GPU
    return Accelerator(kwargs_handlers=[] if torch.cuda.is_available() else [pg])


def train(accelerator: Any, name: str, how: str) -> tuple[torch.Tensor, Any]:
    """``how``: plain (distopt.create), zero (ZeroOptimizer), wrap (deepspeed.wrap), refuse
    (tensor/matrix recipe under DeepSpeed without wrap: expected to raise)."""
    from accelerate.utils import DistributedType

    model = build()
    opt: Any = distopt.create(name, groups(model, name))
    if how == "zero":
        from distopt.distributed.zero import ZeroOptimizer

        opt = ZeroOptimizer(opt, named_parameters=model)
    elif how == "wrap":
        from distopt.integrations import deepspeed as dsi

        opt = dsi.wrap(opt, model)
    loader = torch.utils.data.DataLoader(dataset(accelerator.num_processes), batch_size=MICRO, shuffle=False)
    pmodel, popt, ploader = accelerator.prepare(model, opt, loader)
    ds = accelerator.distributed_type == DistributedType.DEEPSPEED
    steps = 0
    for x, y in ploader:
        popt.zero_grad()
        accelerator.backward(loss_of(pmodel, x, y))  # DeepSpeed: engine.backward + engine.step
        if not ds:
            accelerator.clip_grad_norm_(pmodel.parameters(), CLIP)
        popt.step()
        steps += 1
    assert steps == STEPS, f"rank {accelerator.process_index} saw {steps} batches, expected {STEPS}"
    if ds and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            got = flat(params).clone()
    else:
        got = flat(accelerator.unwrap_model(pmodel).parameters()) if not ds else flat(model.parameters())
    accelerator.free_memory(pmodel, popt, ploader)
    return got, opt


def run(mode: str) -> dict[str, Any]:
    from accelerate.utils import DistributedType

    accelerator = make_accelerator(mode)
    expected = {"ddp": DistributedType.MULTI_CPU, "fsdp2": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}
    assert accelerator.distributed_type == expected[mode], accelerator.distributed_type
    assert accelerator.num_processes == dist.get_world_size() == 2, accelerator.num_processes
    out: dict[str, Any] = {"skipped": skipped(), "distributed_type": str(accelerator.distributed_type)}
    clip = CLIP
    hows = {"ddp": ["plain", "zero"], "fsdp2": ["plain"], "deepspeed": ["wrap"]}[mode]
    if mode == "fsdp2":
        out["fsdp_version"] = accelerator.state.fsdp_plugin.fsdp_version
    if mode == "deepspeed":
        cfg = accelerator.state.deepspeed_plugin.deepspeed_config
        clip = float(cfg.get("gradient_clipping", 0.0) or 0.0)
        out["zero_stage"] = accelerator.state.deepspeed_plugin.zero_stage
        out["gradient_clipping"] = clip
    for name in recipes():
        ref = reference(name, accelerator.num_processes, clip)
        row: dict[str, Any] = {}
        for how in hows:
            t0 = time.perf_counter()
            try:
                got, _ = train(accelerator, name, how)
                row[how] = {"rel_diff": rel_diff(got, ref), "moved": rel_diff(got, flat(build().parameters())),
                            "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - reported and asserted by the test
                row[how] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "traceback": traceback.format_exc()[-2500:]}
                accelerator.free_memory()  # drop the failed run's model (clip_grad_norm_ matches models by params)
        out[name] = row
    if mode == "deepspeed" and "muon" in distopt.available():
        # without wrap(): DeepSpeed hands the optimizer flat 1-D partitions; muon must refuse
        try:
            train(accelerator, "muon", "refuse")
            out["refuse"] = {"raised": None}
        except Exception as exc:  # noqa: BLE001
            out["refuse"] = {"raised": f"{type(exc).__name__}: {str(exc)[:300]}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ddp", "fsdp2", "deepspeed"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "deepspeed":
        import deepspeed.ops

        # DeepSpeed compiles a shared-memory all-reduce kernel (C++, minutes on 2 cores) at its
        # first CPU init; these tests only need gloo's collectives, so skip that build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    t0 = time.perf_counter()
    error = None
    try:
        result = run(args.mode)
    except Exception:  # noqa: BLE001 - reported to the test with the traceback
        result, error = {}, traceback.format_exc()
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "result": result, "error": error,
                                      "seconds": time.perf_counter() - t0})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "mode": args.mode, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
