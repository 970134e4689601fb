"""A small LLaMA-style causal LM (RMSNorm, RoPE, SwiGLU: distopt.bench.workloads_lm.Llama) trained
with a distopt optimizer under four data-parallel backends, on text that ships with Python (the
standard-library sources, read as bytes). Runs on CPU (gloo) or GPUs (nccl).

    torchrun --standalone --nproc_per_node 2 examples/train_lm_sharded.py --backend fsdp2 --optimizer muon --steps 20
    torchrun --standalone --nproc_per_node 2 examples/train_lm_sharded.py --backend zero --optimizer shampoo
    torchrun --standalone --nproc_per_node 2 examples/train_lm_sharded.py --backend ddp --optimizer adamw
    DS_ACCELERATOR=cpu NUM_GPUS=2 DS_CONFIG=launchers/configs/zero2.json \\
        launchers/deepspeed.sh examples/train_lm_sharded.py --backend deepspeed --optimizer soap
    python examples/train_lm_sharded.py --optimizer muon          (one process, no distribution)

Backends (``--backend``):

- ``ddp``: ``DistributedDataParallel`` + the optimizer as is (every rank keeps the whole state);
- ``zero``: DDP + :class:`distopt.distributed.zero.ZeroOptimizer` (each rank keeps ~1/N of the
  state: elementwise state in flat slices, each Shampoo/SOAP/Muon matrix owned whole by one rank);
- ``fsdp2``: ``fully_shard`` on every block and on the root; ``distopt.create`` on the sharded
  model's (DTensor) parameters: distopt's step hook runs the owner protocol of
  :mod:`distopt.distributed.fsdp` (matrix recipes see whole matrices, assembled on their owner);
- ``deepspeed``: ``distopt.integrations.deepspeed.initialize`` (the same arguments and return
  values as ``deepspeed.initialize``) with the JSON of ``--deepspeed_config`` (default
  ``launchers/configs/zero2.json``); its ``train_micro_batch_size_per_gpu`` and
  ``gradient_clipping`` override ``--batch`` and ``--clip``. On CPU set ``DS_ACCELERATOR=cpu``
  (set here when no GPU is visible).

Every backend gives the parameters of one process that sees the whole global batch (``--batch``
sequences per rank), up to fp32 rounding; ``--out`` saves rank 0's loss history and the flat
final parameters (``torch.save``; tests/distributed/test_launchers.py compares them with a
one-process run). ``--opt KEY=VALUE`` overrides a hyperparameter in every param group (e.g.
``--opt ns_dtype=float32``).
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distopt
from distopt.bench.workloads_lm import Llama, LlamaBlock, byte_tokens, stdlib_corpus

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"vocab": 128, "dim": 64, "depth": 2, "heads": 4, "hidden": 172, "context": 64}
LR = {"adamw": 3e-3, "muon": 2e-2, "shampoo": 3e-3, "soap": 3e-3}


def build(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(**MODEL)


def param_groups(model: torch.nn.Module, optimizer: str, lr: float | None, overrides: dict[str, Any]) -> list[dict]:
    """Muon on the blocks' matrices and its AdamW branch on embedding, head and norms (Jordan et
    al. 2024); the other recipes: weight decay on matrices, none on the norm gains."""
    lr = LR.get(optimizer, 1e-3) if lr is None else lr
    named = list(model.named_parameters())
    if optimizer == "muon":
        hidden = [p for n, p in named if p.ndim == 2 and n.startswith("blocks.")]
        other = [p for n, p in named if not (p.ndim == 2 and n.startswith("blocks."))]
        return [{"params": hidden, "lr": lr, **overrides},
                {"params": other, "lr": lr, "use_muon": False, "adamw_lr": 3e-3, **overrides}]
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    return [{"params": decay, "lr": lr, "weight_decay": 0.1, **overrides},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0, **overrides}]


def parse_opt(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if value.startswith("torch.") or value in ("float32", "float64", "bfloat16", "float16"):
            out[key] = getattr(torch, value.removeprefix("torch."))
        else:
            try:
                out[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                out[key] = value
    return out


def corpus(max_chars: int = 200_000) -> torch.Tensor:
    text, _ = stdlib_corpus()
    return byte_tokens(text[:max_chars], MODEL["vocab"])


def global_batch(tokens: torch.Tensor, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random windows of context + 1 tokens (the same on every rank; each rank takes its rows)."""
    n = MODEL["context"]
    g = torch.Generator().manual_seed(10_000 + step)
    starts = torch.randint(0, len(tokens) - n - 1, (size,), generator=g)
    windows = torch.stack([tokens[s:s + n + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def flat_params(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().float().cpu().reshape(-1) for p in params])


def train_single(optimizer: str, steps: int, batch: int, clip: float, lr: float | None = None,
                 overrides: dict[str, Any] | None = None, shards: int = 1) -> dict[str, Any]:
    """One process on the whole global batch of ``batch`` sequences: the reference of every backend.

    ``shards`` > 1: the gradient is the mean of the gradients of ``shards`` equal slices of the
    batch, the numbers a data-parallel all-reduce produces (with 2 ranks, bit for bit). One
    backward on the whole batch differs from it by fp32 rounding, which recipes with a
    degenerate statistic amplify: from that rounding alone SOAP here (embedding rows of unused
    bytes have zero gradient, so the eigenbasis of its statistic is not unique) ends 5e-2
    relative apart after 8 steps, Shampoo with its default epsilon 1e-12 0.13 after 20 steps
    (5e-6 with epsilon 1e-3), Muon with fp32 Newton-Schulz 1e-6."""
    model = build()
    opt = distopt.create(optimizer, param_groups(model, optimizer, lr, overrides or {}))
    tokens, losses = corpus(), []
    for step in range(steps):
        x, y = global_batch(tokens, step, batch)
        opt.zero_grad()
        if shards > 1:
            grads, parts = None, []
            for xs, ys in zip(x.chunk(shards), y.chunk(shards)):
                part = torch.nn.functional.cross_entropy(model(xs).flatten(0, 1), ys.flatten())
                g = torch.autograd.grad(part, list(model.parameters()))
                grads = list(g) if grads is None else [a + b for a, b in zip(grads, g)]
                parts.append(part.detach())
            for p, g in zip(model.parameters(), grads):
                p.grad = g / shards
            loss = torch.stack(parts).mean()
        else:
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(float(loss.detach()))
    return {"losses": losses, "params": flat_params(list(model.parameters()))}


def full_params(model: torch.nn.Module, backend: str, engine: Any = None) -> list[torch.Tensor]:
    if backend == "fsdp2":
        return [p.full_tensor() for p in model.parameters()]
    if backend == "deepspeed" and engine is not None and engine.zero_optimization_stage() == 3:
        import deepspeed

        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return list(model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["ddp", "zero", "fsdp2", "deepspeed"], default="ddp")
    parser.add_argument("--optimizer", default="adamw", help="shampoo | soap | muon | adamw | any distopt name")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping (0: off)")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="hyperparameter override")
    parser.add_argument("--out", default=None, help="rank 0 saves losses and the flat final parameters (torch.save)")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", default=str(ROOT / "launchers/configs/zero2.json"))
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args()
    overrides = parse_opt(args.opt)
    if args.optimizer not in distopt.available():
        parser.error(f"--optimizer {args.optimizer!r} is not registered; available: {', '.join(distopt.available())}")

    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not cuda:
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    t0 = time.perf_counter()
    if args.backend == "deepspeed":
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif distributed:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.backend != "ddp" and world == 1 and args.backend != "deepspeed":
        print(f"--backend {args.backend} with one process: nothing is sharded", flush=True)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build().to(device)
    engine: Any = None
    clip = args.clip
    if args.backend == "deepspeed":
        from distopt.integrations import deepspeed as dsi

        config = json.loads(Path(args.deepspeed_config).read_text())
        config.setdefault("steps_per_print", 10 ** 9)
        config.setdefault("train_micro_batch_size_per_gpu", args.batch)
        args.batch = int(config["train_micro_batch_size_per_gpu"])
        clip = float(config.get("gradient_clipping", 0.0) or 0.0)  # the engine clips
        opt = distopt.create(args.optimizer, param_groups(model, args.optimizer, args.lr, overrides))
        engine, opt, _, _ = dsi.initialize(model=model, optimizer=opt, config=config)
        forward: Any = engine
    elif args.backend == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.modules():
            if isinstance(block, LlamaBlock):
                fully_shard(block)
        fully_shard(model)
        forward = model
        opt = distopt.create(args.optimizer, param_groups(model, args.optimizer, args.lr, overrides))
    else:
        forward = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        opt = distopt.create(args.optimizer, param_groups(model, args.optimizer, args.lr, overrides))
        if args.backend == "zero":
            from distopt.distributed.zero import ZeroOptimizer

            opt = ZeroOptimizer(opt, named_parameters=model)

    tokens = corpus()
    if rank == 0:
        n_params = sum(p.numel() for p in build().parameters())
        print(f"backend {args.backend} optimizer {args.optimizer} world {world} params {n_params} tokens {len(tokens)} "
              f"setup {time.perf_counter() - t0:.1f}s", flush=True)
    losses: list[float] = []
    t1 = time.perf_counter()
    for step in range(args.steps):
        x, y = global_batch(tokens, step, args.batch * world)
        rows = slice(rank * args.batch, (rank + 1) * args.batch)
        x, y = x[rows].to(device), y[rows].to(device)
        loss = torch.nn.functional.cross_entropy(forward(x).flatten(0, 1), y.flatten())
        if engine is not None:
            engine.backward(loss)
            engine.step()  # clipping (config) and the optimizer step, at the accumulation boundary
        else:
            opt.zero_grad()
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)  # global norm, before preconditioning
            opt.step()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        if rank == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"step {step:4d} loss {losses[-1]:.4f}", flush=True)
    params = full_params(model, args.backend, engine)
    if rank == 0:
        print(f"done: {args.steps} steps in {time.perf_counter() - t1:.1f}s, final loss {losses[-1]:.4f}", flush=True)
        if args.out:
            torch.save({"backend": args.backend, "optimizer": args.optimizer, "world_size": world, "batch": args.batch,
                        "clip": clip, "losses": losses, "params": flat_params(params)}, args.out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
