"""Worker for tests/distributed/test_fsdp_deepspeed.py (torchrun, gloo on CPU; DeepSpeed with
DS_ACCELERATOR=cpu). One launch per backend runs every recipe of RECIPES that is registered
(unregistered ones are reported as skipped, never dropped):

    torchrun --standalone --nproc_per_node 2 sharded_worker.py fsdp2 --out r.json
    DS_ACCELERATOR=cpu torchrun ... sharded_worker.py zero1|zero2|zero3 --out r.json
    DS_ACCELERATOR=cpu torchrun ... sharded_worker.py refuse|ckpt|offload --out r.json

Each rank trains the same model from the same init on the same full batch (so the reduced
gradient equals the single-process gradient up to the exact (g + g) / 2), STEPS steps, then the
full parameters are compared with the single-process run (computed on rank 0, broadcast).
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

STEPS = 10
RECIPES = ["adamw", "lion", "lamb", "adafactor", "adam_mini", "muon", "shampoo", "soap", "galore"]
OPTIONAL = {"shampoo", "soap", "galore"}
HPARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adamw": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "lion": ({"lr": 1e-3, "weight_decay": 0.1}, {"lr": 3e-4, "weight_decay": 0.0}),
    "lamb": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "adafactor": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3}),
    "adam_mini": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "muon": ({"lr": 2e-2, "weight_decay": 0.1}, {"lr": 1e-2, "use_muon": False, "adamw_weight_decay": 0.01}),
    "shampoo": ({"lr": 1e-2, "precondition_frequency": 3}, {"lr": 3e-3}),
    "soap": ({"lr": 1e-2, "precondition_frequency": 3}, {"lr": 3e-3, "weight_decay": 0.0}),
    "galore": ({"lr": 1e-2, "rank": 4, "update_proj_gap": 4}, {"lr": 3e-3, "use_galore": False}),
}


class Net(torch.nn.Module):
    """Uneven row splits on 2 ranks (5 and 37 rows, odd vector sizes), a 1-row matrix (one
    rank's shard is empty), an embedding in its own group, and a param that gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(16, 37)
        self.l2 = torch.nn.Linear(16, 37)
        self.embed = torch.nn.Embedding(33, 37)
        self.mix = torch.nn.Parameter(torch.randn(37, 29) * 0.2)
        self.gate = torch.nn.Parameter(torch.randn(1, 29) * 0.5)
        self.head = torch.nn.Linear(29, 5)
        self.unused = torch.nn.Parameter(torch.randn(7, 5))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x)) + torch.tanh(self.l2(x)) + self.embed(idx)
        h = torch.tanh(h @ self.mix) * torch.sigmoid(self.gate)
        return self.head(h)


FROZEN_UNUSED = False  # DeepSpeed modes: a trainable param always gets a (zero) flat gradient there


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    if FROZEN_UNUSED:
        net.unused.requires_grad_(False)
    return net


def groups(model: torch.nn.Module, name: str) -> list[dict[str, Any]]:
    g0, g1 = HPARAMS[name]
    rest = [p for n, p in model.named_parameters() if not n.startswith("embed")]
    return [{"params": rest, **g0}, {"params": [model.embed.weight], **g1}]


def batch(step: int, size: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(size, 16, generator=g), torch.randint(0, 33, (size,), generator=g), torch.randn(size, 5, generator=g)


def loss_of(model: Any, data: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, idx, y = data
    return torch.nn.functional.mse_loss(model(x, idx), y)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([full(p).reshape(-1) for p in model.parameters()])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())


def reference(name: str) -> torch.Tensor:
    """Single-process run on rank 0, broadcast."""
    if dist.get_rank() == 0:
        model = build()
        opt = distopt.create(name, groups(model, name))
        for step in range(STEPS):
            opt.zero_grad()
            loss_of(model, batch(step)).backward()
            opt.step()
        ref = flat(model)
    else:
        ref = torch.empty_like(flat(build()))
    dist.broadcast(ref, 0)
    return ref


def recipes() -> list[str]:
    return [n for n in RECIPES if n in distopt.available()]


def skipped() -> dict[str, str]:
    return {n: f"{n!r} is not registered (distopt.available())" for n in RECIPES if n not in distopt.available()}


# ----------------------------------------------------------------------------- FSDP2
def fsdp_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = build()
    for m in (model.l1, model.l2, model.head):
        fully_shard(m)
    fully_shard(model)
    return model


def run_fsdp(name: str, how: str) -> torch.Tensor:
    from distopt.distributed.fsdp import shard_aware

    model = fsdp_model()
    opt: Any = distopt.create(name, groups(model, name))
    if how == "wrapped":
        opt = shard_aware(opt, named_parameters=model)
    for step in range(STEPS):
        opt.zero_grad()
        loss_of(model, batch(step)).backward()
        opt.step()
    return flat(model)


def fsdp2() -> dict[str, Any]:
    out: dict[str, Any] = {"skipped": skipped()}
    for name in recipes():
        ref = reference(name)
        row: dict[str, Any] = {}
        for how in ("plain", "wrapped"):
            t0 = time.perf_counter()
            try:
                got = run_fsdp(name, how)
                row[how] = {"rel_diff": rel_diff(got, ref), "bitwise": bool(torch.equal(got, ref)),
                            "moved": rel_diff(got, flat(build())), "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001 - reported and asserted by the test
                row[how] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out[name] = row
    return out


# ----------------------------------------------------------------------------- DeepSpeed
def ds_config(stage: int) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 24, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "fp16": {"enabled": False}, "bf16": {"enabled": False}, "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def ds_full_params(engine: Any, model: torch.nn.Module, stage: int) -> torch.Tensor:
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            return torch.cat([p.detach().clone().reshape(-1) for p in model.parameters()])
    return flat(model)


def train_ds(engine: Any, steps: range) -> None:
    for step in steps:
        engine.backward(loss_of(engine, batch(step)))
        engine.step()


def run_deepspeed(name: str, stage: int) -> tuple[torch.Tensor, Any]:
    from distopt.integrations import deepspeed as dsi

    model = build()
    opt = distopt.create(name, groups(model, name))
    engine, optimizer, _, _ = dsi.initialize(model=model, optimizer=opt, config=ds_config(stage))
    train_ds(engine, range(STEPS))
    return ds_full_params(engine, model, stage), optimizer


def zero(stage: int) -> dict[str, Any]:
    out: dict[str, Any] = {"skipped": skipped()}
    for name in recipes():
        ref = reference(name)
        t0 = time.perf_counter()
        got, _ = run_deepspeed(name, stage)
        out[name] = {"rel_diff": rel_diff(got, ref), "bitwise": bool(torch.equal(got, ref)),
                     "moved": rel_diff(got, flat(build())), "seconds": time.perf_counter() - t0}
    return out


CKPT_RECIPES = ["adamw", "muon", "shampoo"]  # fragments only; owned matrices; owned preconditioners


def ckpt(root: Path) -> dict[str, Any]:
    """engine.save_checkpoint after STEPS // 2 steps, a fresh engine load_checkpoint and the rest:
    equal to the uninterrupted run; the loaded state refused under another world size."""
    from distopt.integrations import deepspeed as dsi

    out: dict[str, Any] = {"skipped": {n: "not registered" for n in CKPT_RECIPES if n not in distopt.available()}}
    for stage in (1, 2, 3):
        for name in [n for n in CKPT_RECIPES if n in distopt.available()]:
            ref, _ = run_deepspeed(name, stage)
            engines = []
            for _ in range(2):
                model = build()
                engine, *_ = dsi.initialize(model=model, optimizer=distopt.create(name, groups(model, name)),
                                            config=ds_config(stage))
                engines.append((model, engine))
            train_ds(engines[0][1], range(STEPS // 2))
            engines[0][1].save_checkpoint(str(root / f"{name}-{stage}"), tag="half")
            model, engine = engines[1]
            engine.load_checkpoint(str(root / f"{name}-{stage}"), tag="half")
            adapter = engine.optimizer.optimizer  # the DeepSpeedOptimizer inside DeepSpeed's ZeRO optimizer
            loaded = sorted(adapter.state_dict()["distopt_deepspeed"])  # saved again before a step: nothing lost
            train_ds(engine, range(STEPS // 2, STEPS))
            got = ds_full_params(engine, model, stage)
            state = adapter.state_dict()
            try:
                adapter.load_state_dict({**state, "world_size": 4})
                refused = None
            except ValueError as exc:
                refused = str(exc)
            adapter.load_state_dict({**state, "layout": {k: [] for k in state["layout"]}})
            try:
                train_ds(engine, range(1))  # the owners are rebuilt at the step: their layout is checked
                other_layout = None
            except ValueError as exc:
                other_layout = str(exc)
            out[f"{name}/{stage}"] = {"rel_diff": rel_diff(got, ref), "bitwise": bool(torch.equal(got, ref)),
                                      "keys": sorted(state["distopt_deepspeed"]), "loaded": loaded, "refused": refused,
                                      "other_layout": other_layout}
    return out


def offload() -> dict[str, Any]:
    """ZeRO 1/2/3 with ``offload_optimizer: cpu`` and a distopt client optimizer: equal to one process."""
    from distopt.integrations import deepspeed as dsi

    out: dict[str, Any] = {}
    for stage in (1, 2, 3):
        for name in ("muon", "adamw"):
            ref, model = reference(name), build()
            config = ds_config(stage)
            config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
            config["zero_force_ds_cpu_optimizer"] = False  # a client optimizer, not DeepSpeedCPUAdam
            engine, *_ = dsi.initialize(model=model, optimizer=distopt.create(name, groups(model, name)), config=config)
            train_ds(engine, range(STEPS))
            got = ds_full_params(engine, model, stage)
            out[f"{name}/{stage}"] = {"rel_diff": rel_diff(got, ref), "moved": rel_diff(got, flat(build()))}
    return out


def refuse() -> dict[str, Any]:
    """Plain deepspeed.initialize with distopt recipes: elementwise ones work, others refuse."""
    import deepspeed

    out: dict[str, Any] = {}
    for name, stage in (("muon", 2), ("lamb", 1), ("shampoo", 3), ("adamw", 2)):
        if name not in distopt.available():
            out[f"{name}/{stage}"] = {"skipped": True}
            continue
        model = build()
        opt = distopt.create(name, groups(model, name))
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
        try:
            train_ds(engine, range(2))
            out[f"{name}/{stage}"] = {"raised": None}
        except Exception as exc:  # noqa: BLE001
            out[f"{name}/{stage}"] = {"raised": f"{type(exc).__name__}: {exc}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["fsdp2", "zero1", "zero2", "zero3", "refuse", "ckpt", "offload"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    global FROZEN_UNUSED
    FROZEN_UNUSED = args.mode != "fsdp2"
    t_init = time.perf_counter()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    if args.mode != "fsdp2":
        import deepspeed
        import deepspeed.ops

        # DeepSpeed compiles a shared-memory all-reduce kernel (C++, minutes on 2 cores) at its
        # first CPU init; these tests only need gloo's collectives, so skip that build
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        deepspeed.init_distributed(dist_backend="gloo")
    print(f"init {time.perf_counter() - t_init:.1f}s", flush=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.perf_counter()
    try:
        if args.mode == "fsdp2":
            result = fsdp2()
        elif args.mode == "refuse":
            result = refuse()
        elif args.mode == "ckpt":
            result = ckpt(Path(args.out).parent)
        elif args.mode == "offload":
            result = offload()
        else:
            result = zero(int(args.mode[-1]))
        error = None
    except Exception:  # noqa: BLE001 - reported to the test with the traceback
        result, error = {}, f"rank {rank}: {traceback.format_exc()}"
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
