"""Worker for tests/distributed/test_zero.py and test_zero_checkpoint.py (run under torchrun,
gloo on CPU), and the shared model / data / recipe settings the tests also use in-process.

    torchrun --standalone --nproc_per_node 2 tests/distributed/zero_worker.py equality --out r.json
    ... ckpt-save --dir D --out r.json   |   ckpt-load --dir D --out r.json

``equality``: for every recipe of RECIPES that is registered, each rank runs the single-process
optimizer (full model, same data) and the ZeroOptimizer for STEPS steps from the same init with
the same full-batch gradient on every rank (the "already reduced" gradient), and reports the max
relative parameter difference, whether it is bitwise equal, per-rank state bytes and the
unsharded state bytes; plus an ``adamw+ddp`` case where DDP averages per-rank half batches.
Unregistered recipes are reported as skipped (with the reason), never silently dropped.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import distopt
from distopt.distributed.zero import ZeroOptimizer

STEPS = 10
# recipes of the brief, then the optional second-order ones (other helpers add them)
RECIPES = ["adamw", "lion", "lamb", "adafactor", "adam_mini", "muon", "shampoo", "soap", "galore"]
OPTIONAL = {"shampoo", "soap", "galore"}
# two param groups with different hyperparameters; group 1 holds the embedding (Muon: AdamW there)
HPARAMS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "adamw": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "lion": ({"lr": 1e-3, "weight_decay": 0.1}, {"lr": 3e-4, "weight_decay": 0.0}),
    "lamb": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "adafactor": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3}),
    "adam_mini": ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0}),
    "muon": ({"lr": 2e-2, "weight_decay": 0.1}, {"lr": 1e-2, "use_muon": False, "adamw_weight_decay": 0.01}),
}


class Net(torch.nn.Module):
    """Matrices of equal shapes (batched Newton–Schulz), odd-sized vectors (uneven slices), a
    conv weight (ndim 4), a 0-d scale, an embedding, and a frozen-by-disuse param (no grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(16, 40)
        self.l2 = torch.nn.Linear(16, 40)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.embed = torch.nn.Embedding(33, 40)
        self.mix = torch.nn.Parameter(torch.randn(40, 37) * 0.2)
        self.head = torch.nn.Linear(37, 5)
        self.scale = torch.nn.Parameter(torch.tensor(1.3))
        self.unused = torch.nn.Parameter(torch.randn(7, 5))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.l1(x)) + torch.tanh(self.l2(x)) + self.embed(idx)
        c = self.conv(img).mean(dim=(2, 3))  # (B, 6)
        h = torch.tanh(h @ self.mix)
        return self.head(h) * self.scale + c[:, :5]


def build(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def groups(model: Net, name: str) -> list[dict[str, Any]]:
    g0, g1 = HPARAMS.get(name, ({"lr": 1e-2}, {"lr": 3e-3}))
    rest = [p for n, p in model.named_parameters() if not n.startswith("embed")]
    return [{"params": rest, **g0}, {"params": [model.embed.weight], **g1}]


def batch(step: int, size: int = 24) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(size, 16, generator=g), torch.randint(0, 33, (size,), generator=g),
            torch.randn(size, 3, 5, 5, generator=g), torch.randn(size, 5, generator=g))


def loss_fn(model: torch.nn.Module, data: tuple[torch.Tensor, ...], part: slice = slice(None)) -> torch.Tensor:
    x, idx, img, y = (t[part] for t in data)
    return torch.nn.functional.mse_loss(model(x, idx, img), y)


class BlockedAdamW(distopt.AdamW):
    """AdamW that declares its matrices MATRIX with three uneven blocks each (two of them
    non-contiguous column boxes): exercises block ownership (``param_blocks``) with a recipe whose
    per-block update is exact, so the result must equal plain AdamW."""

    @classmethod
    def param_locality(cls, group: Any, shape: tuple[int, ...]) -> distopt.Locality:
        return distopt.Locality.MATRIX if len(shape) >= 2 else distopt.Locality.ELEMENTWISE

    @classmethod
    def param_blocks(cls, group: Any, shape: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
        m, n = shape[0], int(torch.Size(shape[1:]).numel())
        return [((0, m // 2), (0, n // 2)), ((0, m // 2), (n // 2, n)), ((m // 2, m), (0, n))]


def make(name: str, model: Net) -> distopt.DistOptimizer:
    return distopt.create(name, groups(model, name))


def train(model: Net, opt: torch.optim.Optimizer, start: int, stop: int, ddp: torch.nn.Module | None = None,
          rank: int = 0, world: int = 1) -> None:
    for step in range(start, stop):
        data = batch(step)
        opt.zero_grad()
        if ddp is None:
            loss_fn(model, data).backward()
        else:
            n = len(data[0])
            loss_fn(ddp, data, slice(rank * n // world, (rank + 1) * n // world)).backward()
        opt.step()


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())


def single(name: str, steps: int = STEPS) -> tuple[Net, distopt.DistOptimizer]:
    model = build()
    opt = make(name, model)
    train(model, opt, 0, steps)
    return model, opt


def slack(zero: ZeroOptimizer) -> float:
    """Bytes a slice may exceed its exact share by: cuts are rounded to ``align`` elements."""
    per_elem = [s.total_state / s.numel for s in zero.plan.params
                if s.locality == distopt.Locality.ELEMENTWISE and s.numel]
    return 2 * zero.plan.align * max(per_elem, default=0.0)


def shared_reference(name: str, rank: int) -> tuple[torch.Tensor, int]:
    """The single-process run's final params and state bytes, computed on rank 0 and broadcast."""
    if rank == 0:
        model, opt = single(name)
        ref, total = flat(model), distopt.state_bytes(opt)
    else:
        ref, total = torch.empty_like(flat(build())), 0
    info = torch.tensor([total], dtype=torch.int64)
    dist.broadcast(ref, 0)
    dist.broadcast(info, 0)
    return ref, int(info.item())


def equality(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = set(distopt.available())
    for name in RECIPES:
        if name not in known:
            out[name] = {"skipped": f"{name!r} is not registered in this checkout (distopt.available())"}
            continue
        ref, total = shared_reference(name, rank)
        model = build()
        zero = ZeroOptimizer(make(name, model), named_parameters=model)
        train(model, zero, 0, STEPS)
        out[name] = {
            "rel_diff": rel_diff(flat(model), ref), "bitwise": bool(torch.equal(flat(model), ref)),
            "state_bytes": distopt.state_bytes(zero), "total_state_bytes": total,
            "bound": zero.plan.summary()["state_bound"], "comm": dict(zero.comm),
            "pieces": len(zero.local), "moved": rel_diff(flat(model), flat(build())),
            "largest_block": zero.plan.largest_block_state, "slack": slack(zero),
            "active_param_bytes": sum(4 * p.numel() for n, p in model.named_parameters() if n != "unused"),
            "elementwise": all(s.locality == distopt.Locality.ELEMENTWISE for s in zero.plan.params),
        }
    # block ownership: BlockedAdamW's boxes must give plain AdamW's result
    ref, total = shared_reference("adamw", rank)
    model = build()
    zero = ZeroOptimizer(BlockedAdamW(groups(model, "adamw")), named_parameters=model)
    train(model, zero, 0, STEPS)
    out["adamw_blocks"] = {"rel_diff": rel_diff(flat(model), ref), "bitwise": bool(torch.equal(flat(model), ref)),
                           "state_bytes": distopt.state_bytes(zero), "total_state_bytes": total,
                           "blocks": sum(1 for pc, _ in zero.local if not pc.is_slice)}
    # realistic DDP: each rank back-propagates half the batch, DDP averages, ZeRO steps
    ref, _ = shared_reference("adamw", rank)
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    zero = ZeroOptimizer(make("adamw", model), named_parameters=model)
    train(model, zero, 0, STEPS, ddp=ddp, rank=rank, world=world)
    out["adamw+ddp"] = {"rel_diff": rel_diff(flat(model), ref), "bitwise": bool(torch.equal(flat(model), ref)),
                        "state_bytes": distopt.state_bytes(zero), "comm": dict(zero.comm)}
    return out


CKPT_RECIPES = ["adamw", "muon", "lamb", "adafactor"]
SAVE_AT = 5


def ckpt_save(rank: int, world: int, root: Path) -> dict[str, Any]:
    """ZeRO run: save a checkpoint after SAVE_AT steps, finish STEPS; resume it on the same
    world size (fresh model/optimizer) and via the rank's own state_dict shard; report diffs."""
    from distopt.distributed import checkpoint as ckpt

    out: dict[str, Any] = {}
    for name in CKPT_RECIPES:
        model = build()
        zero = ZeroOptimizer(make(name, model), named_parameters=model)
        train(model, zero, 0, SAVE_AT)
        ckpt.save(root / name, zero, model=model)
        shard = copy.deepcopy(zero.state_dict())
        params_at_save = [p.detach().clone() for p in model.parameters()]
        train(model, zero, SAVE_AT, STEPS)
        final = flat(model)
        # resume from the distributed checkpoint
        model2 = build(seed=7)
        zero2 = ZeroOptimizer(make(name, model2), named_parameters=model2)
        ckpt.load(root / name, zero2, model=model2)
        train(model2, zero2, SAVE_AT, STEPS)
        # resume from this rank's shard
        model3 = build(seed=7)
        with torch.no_grad():
            for p, q in zip(model3.parameters(), params_at_save):
                p.copy_(q)
        zero3 = ZeroOptimizer(make(name, model3), named_parameters=model3)
        zero3.load_state_dict(shard)
        train(model3, zero3, SAVE_AT, STEPS)
        out[name] = {"dcp_resume": rel_diff(flat(model2), final), "dcp_bitwise": bool(torch.equal(flat(model2), final)),
                     "shard_resume": rel_diff(flat(model3), final)}
        if rank == 0:
            torch.save(final, root / f"{name}.final.pt")
    return out


def ckpt_load(rank: int, world: int, root: Path) -> dict[str, Any]:
    """Load checkpoints written by one process (``root/<name>``), continue to STEPS, compare
    with the uninterrupted single-process run."""
    from distopt.distributed import checkpoint as ckpt

    out: dict[str, Any] = {}
    for name in CKPT_RECIPES:
        ref, _ = shared_reference(name, rank)
        model = build(seed=7)
        zero = ZeroOptimizer(make(name, model), named_parameters=model)
        ckpt.load(root / name, zero, model=model)
        train(model, zero, SAVE_AT, STEPS)
        out[name] = {"rel_diff": rel_diff(flat(model), ref), "bitwise": bool(torch.equal(flat(model), ref)),
                     "state_bytes": distopt.state_bytes(zero)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["equality", "ckpt-save", "ckpt-load"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if args.mode == "equality":
            result = equality(rank, world)
        elif args.mode == "ckpt-save":
            result = ckpt_save(rank, world, Path(args.dir))
        else:
            result = ckpt_load(rank, world, Path(args.dir))
        error = None
    except Exception:  # noqa: BLE001 - reported to the test, with the traceback
        import traceback

        result, error = {}, f"rank {rank}: {traceback.format_exc()}"
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "result": result, "error": error})
    if rank == 0:
        Path(args.out).write_text(json.dumps({"world_size": world, "ranks": gathered}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
