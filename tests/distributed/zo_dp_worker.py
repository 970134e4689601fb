"""Worker for tests/distributed/test_zo_data_parallel.py: data-parallel zeroth-order training through
the usual wrappers, 2 CPU ranks (gloo), one launch per mode (also runnable by hand):

    torchrun --standalone --nproc_per_node 2 tests/distributed/zo_dp_worker.py ddp --out /tmp/ddp.pt
    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/zo_dp_worker.py deepspeed --out ds.pt
    accelerate launch --config_file launchers/accelerate/multi_cpu_ddp.yaml --multi_gpu --num_processes 2 \\
        tests/distributed/zo_dp_worker.py accelerate --out acc.pt

- ``ddp``: the model wrapped in ``torch.nn.parallel.DistributedDataParallel``; the closure calls the
  DDP module under ``no_grad``; a counting comm hook must see no gradient bucket. Also the Hugging
  Face :class:`distopt.zo.hf.ZOTrainer` (its Trainer wraps the model in DDP itself; sequential
  sampler, so rank r's micro-batches are the Trainer's batches r, r + 2, ... as in Accelerate's
  sharding).
- ``deepspeed``: ``distopt.integrations.deepspeed.initialize(model=..., optimizer=zo, config=...)``
  at ZeRO stage 0 (float64; the recipe then averages over the engine's data-parallel group) and
  stage 3 (float32, parameters partitioned); stages 1/2 must be refused, and so must a zeroth-order
  recipe that plain ``deepspeed.initialize`` (ZeRO-2) gave flat partitions.
- ``accelerate``: ``accelerator.prepare(model, zo, loader)`` (DDP on CPU); the prepared loader
  shards each global batch; ``AcceleratedOptimizer.step(closure)`` forwards the closure.

Every rank takes ``1/world`` of each global batch of :func:`zo_worker.batch`, so the trajectory must
equal one process on the union (:func:`zo_worker.train`). :func:`wire` records every gloo
collective issued during training (torch profiler: name, elements, dtype), an account of the
bytes that cross the process group that is independent of the optimizer's own ``comm`` counter.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zo_worker  # noqa: E402

import distopt  # noqa: E402
import distopt.zo  # noqa: E402,F401

STEPS = 10
NAMES = ["zo_sgd", "zo_sgd_cons"]
F64 = torch.float64
DTYPE_BYTES = {"double": 8, "float": 4, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
               "unsigned char": 1, "signed char": 1, "bool": 1, "short int": 2}


@contextlib.contextmanager
def wire() -> Iterator[dict[str, Any]]:
    """Every gloo collective this rank issues inside the block: ``{"calls", "bytes", "ops"}``."""
    rec: dict[str, Any] = {"calls": 0, "bytes": 0, "ops": []}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        yield rec
    for e in prof.profiler.kineto_results.events():   # the raw events: prof.events() takes ~1 s per 10k ops
        if not e.name().startswith("gloo:"):
            continue
        size = sum(math.prod(s) * DTYPE_BYTES[d] for s, d in zip(e.shapes(), e.dtypes()) if s)
        rec["calls"] += 1
        rec["bytes"] += size
        rec["ops"].append((e.name(), size))


def shard(t: int, rank: int, world: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = zo_worker.batch(t, dtype)
    per = zo_worker.BATCH // world
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


def loss_fn(model: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The batch-mean loss, always summed in float64: with float32 weights (ZeRO-3 refuses float64) a
    float32 mean of a half batch and of the whole batch round differently, and the finite
    difference divides that rounding by 2·eps (~1e-5 relative after 10 steps); in float64 the
    mean of the per-rank means is the union's mean to ~1e-16."""
    return torch.nn.functional.mse_loss(model(x).double(), y.double())


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank (after training: not on the wire record)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summary(opt: Any, params: list[torch.Tensor], rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"params": [p.detach().clone() for p in params], "bytes": opt.comm.bytes, "calls": opt.comm.calls,
            "agree": distopt.zo.ranks_agree(params), "wire": rec, **extra}


# ----------------------------------------------------------------------------- ddp (+ ZOTrainer)
def run_ddp(name: str, rank: int, world: int, control: bool = False) -> dict[str, Any]:
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(zo_worker.build(F64))
    buckets = {"calls": 0}

    def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
        buckets["calls"] += 1
        return allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting_hook)
    opt = distopt.create(name, model.parameters(), **zo_worker.HPARAMS[name], process_group=True)
    with wire() as rec:
        for t in range(STEPS):
            x, y = shard(t, rank, world, F64)
            opt.step(lambda: loss_fn(model, x, y))
    out = summary(opt, list(model.module.parameters()), rec, grad_buckets=buckets["calls"])
    if control:   # one backward through the same DDP module: the counters must see its gradient all-reduce
        with wire() as ctrl:
            loss_fn(model, *shard(0, rank, world, F64)).backward()
        out["control"] = {"grad_buckets": buckets["calls"], "wire": ctrl}
    return out


class _Wrapped(torch.nn.Module):
    """The worker's network with the ``forward(x, labels) -> {"loss": ...}`` a Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = zo_worker.build(F64)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.mse_loss(self.net(x), labels)}


def run_trainer(out_dir: str, world: int) -> dict[str, Any]:
    from transformers import TrainingArguments

    from distopt.zo.hf import ZOTrainer

    xs, ys = zip(*(zo_worker.batch(t, F64) for t in range(STEPS)))
    x, y = torch.cat(xs), torch.cat(ys)
    data = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    seen: dict[str, Any] = {}

    class Trainer(ZOTrainer):
        def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any) -> torch.Tensor:
            seen.setdefault("model", type(model).__name__)
            seen.setdefault("firsts", []).append(float(inputs["x"][0, 0]))
            return super().training_step(model, inputs, *args)

    hp = zo_worker.HPARAMS["zo_sgd"]
    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=zo_worker.BATCH // world,
                             max_steps=STEPS, learning_rate=hp["lr"], weight_decay=hp["weight_decay"],
                             lr_scheduler_type="constant", train_sampling_strategy="sequential",
                             max_grad_norm=0.0, logging_steps=10 * STEPS, save_strategy="no", report_to=[],
                             use_cpu=True, ddp_backend="gloo", dataloader_num_workers=0, disable_tqdm=True)
    model = _Wrapped()
    trainer = Trainer(model=model, args=args, train_dataset=data, zo_optimizer="zo_sgd", zo_kwargs={"n": hp["n"]})
    with wire() as rec:
        trainer.train()
    opt = trainer.zo_optimizer
    return summary(opt, list(model.net.parameters()), rec, model=seen["model"], firsts=gather(seen["firsts"]),
                   process_group=str(opt.process_group))


# ----------------------------------------------------------------------------- deepspeed
def ds_config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": zo_worker.BATCH // dist.get_world_size(), "zero_optimization": zero}


def run_deepspeed(name: str, stage: int, rank: int, world: int) -> dict[str, Any]:
    import deepspeed

    from distopt.integrations import deepspeed as dsi

    dtype = F64 if stage == 0 else torch.float32   # ZeRO-3 partitions only fp16/bf16/fp32
    model = zo_worker.build(dtype)
    opt = distopt.create(name, model.parameters(), **zo_worker.HPARAMS[name])   # no process_group: the engine's
    engine, got, _, _ = dsi.initialize(model=model, optimizer=opt, config=ds_config(stage))
    assert got is opt and (engine.optimizer is None or stage == 3)   # ZeRO-3: DeepSpeedZeRoOffload
    dp_rank, dp_world = dist.get_rank(engine.data_parallel_group), dist.get_world_size(engine.data_parallel_group)
    with wire() as rec:
        for t in range(STEPS):
            x, y = shard(t, dp_rank, dp_world, dtype)
            opt.step(lambda: loss_fn(engine, x, y))
    params = list(model.parameters())
    if stage == 3:
        assert all(p.numel() == 0 and hasattr(p, "ds_tensor") for p in params)
        with deepspeed.zero.GatheredParameters(params):
            full = [p.detach().clone() for p in params]
    else:
        full = params
    return summary(opt, full, rec, group_is_engine_dp=opt.process_group is engine.data_parallel_group,
                   dtype=str(full[0].dtype))


def deepspeed_refusals() -> dict[str, str | None]:
    """ZeRO-1/2 through distopt's initialize, and a ZeRO-2 engine built by plain deepspeed.initialize."""
    import deepspeed

    from distopt.integrations import deepspeed as dsi

    out: dict[str, str | None] = {}
    for stage in (1, 2):
        model = zo_worker.build(torch.float32)
        try:
            dsi.initialize(model=model, optimizer=distopt.create("zo_sgd", model.parameters(), lr=1e-2),
                           config=ds_config(stage))
            out[f"stage{stage}"] = None
        except ValueError as exc:
            out[f"stage{stage}"] = str(exc)
    model = zo_worker.build(torch.float32)
    opt = distopt.create("zo_sgd", model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt,
                                      config={**ds_config(2), "zero_allow_untested_optimizer": True})
    x, y = zo_worker.batch(0, torch.float32)
    try:  # the step itself refuses (ZOOptimizer's ZO_STEP_HOOKS), before any perturbation
        opt.step(lambda: torch.nn.functional.mse_loss(engine(x), y))
        out["plain_zero2"] = None
    except RuntimeError as exc:
        out["plain_zero2"] = str(exc)
    try:
        dsi.wrap(opt)
        out["wrap"] = None
    except ValueError as exc:
        out["wrap"] = str(exc)
    return out


# ----------------------------------------------------------------------------- accelerate
def run_accelerate(accelerator: Any, name: str) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    world = accelerator.num_processes
    xs, ys = zip(*(zo_worker.batch(t, F64) for t in range(STEPS)))
    data = torch.utils.data.TensorDataset(torch.cat(xs), torch.cat(ys))
    loader = torch.utils.data.DataLoader(data, batch_size=zo_worker.BATCH // world, shuffle=False)
    model = zo_worker.build(F64)
    opt = distopt.create(name, model.parameters(), **zo_worker.HPARAMS[name], process_group=True)
    pmodel, popt, ploader = accelerator.prepare(model, opt, loader)
    firsts, steps = [], 0
    with wire() as rec:
        for x, y in ploader:
            firsts.append(float(x[0, 0]))
            popt.step(lambda: loss_fn(pmodel, x, y))
            steps += 1
    out = summary(opt, list(model.parameters()), rec, steps=steps, model=type(pmodel).__name__,
                  optimizer=type(popt).__name__, ddp=isinstance(pmodel, DDP), firsts=gather(firsts))
    accelerator.free_memory(pmodel, popt, ploader)
    return out


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("ddp", "deepspeed", "accelerate"))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    if args.mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        pg = InitProcessGroupKwargs(backend="gloo", timeout=datetime.timedelta(seconds=120))
        accelerator = Accelerator(cpu=True, kwargs_handlers=[pg])
        results["distributed_type"] = str(accelerator.distributed_type)
        for name in NAMES:
            results[name] = run_accelerate(accelerator, name)
    else:
        if args.mode == "deepspeed":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # skip a multi-minute C++ build
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if args.mode == "ddp":
            for name in NAMES:
                results[name] = run_ddp(name, rank, world, control=name == NAMES[0])
            results["trainer"] = run_trainer(str(Path(args.out).parent / "trainer"), world)
        else:
            for name in NAMES:
                results[f"{name}/stage0"] = run_deepspeed(name, 0, rank, world)
            results["zo_sgd/stage3"] = run_deepspeed("zo_sgd", 3, rank, world)
            results["refusals"] = deepspeed_refusals()
    results["world"] = dist.get_world_size()
    if dist.get_rank() == 0:
        torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
