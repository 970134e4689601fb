"""``distopt bench shard``: the ownership planner on real model shapes, and the ZeroOptimizer's
measured per-rank state bytes and communication bytes per step.

Planner table: for GPT-2 small and Llama-3.2-1B parameter lists, N in (2, 8, 64) and three
recipes: ``adamw`` (every param elementwise), ``muon`` (matrices MATRIX with the Newton–Schulz
cost; embeddings in a ``use_muon=False`` group, i.e. AdamW, as the Muon authors advise) and
``shampoo-like`` (every param MATRIX, cut in Distributed Shampoo's ≤1024 blocks, block cost
``shampoo_block_cost``, state ``shampoo_block_state``): max/mean compute load, its lower bound
for whole-block ownership, max per-rank state against ``total/N + largest block``.

Measurement (``measure``): ``torchrun --standalone --nproc_per_node N -m
distopt.distributed.bench --worker ...`` on CPU with gloo; params with the shapes of the model
and random gradients; rank 0 first measures the unsharded optimizer (``distopt.state_bytes``
after one step), then every rank runs the ZeroOptimizer for a step and reports its own bytes and
the payload of its collectives (all-gather output + "has grad" flags).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from distopt.core.operator import Locality
from distopt.distributed.plan import (
    BlockSpec, ParamSpec, box_shape, plan_ownership, shampoo_block_cost, shampoo_block_state, shampoo_blocks,
)
from distopt.distributed.shapes import MODELS, embedding_names

PLAN_RECIPES = ("adamw", "muon", "shampoo-like")
WORLD_SIZES = (2, 8, 64)


def plan_specs(recipe: str, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> list[ParamSpec]:
    """Planner input for one of :data:`PLAN_RECIPES` on a (name, shape) list."""
    if recipe == "shampoo-like":
        return [ParamSpec(n, tuple(s), Locality.MATRIX, blocks=tuple(
            BlockSpec(b, shampoo_block_cost(box_shape(b)), shampoo_block_state(box_shape(b)))
            for b in shampoo_blocks(s))) for n, s in shapes]
    import distopt
    from distopt.distributed.specs import recipe_specs

    cls = distopt.get(recipe)
    emb = embedding_names(list(shapes))
    group_of = (lambda n, s: {"use_muon": False} if n in emb else {}) if recipe == "muon" else None
    return recipe_specs(cls, shapes, group_of)


def planner_rows(models: Sequence[str] = tuple(MODELS), world_sizes: Sequence[int] = WORLD_SIZES,
                 recipes: Sequence[str] = PLAN_RECIPES) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        shapes = MODELS[model]()
        for recipe in recipes:
            specs = plan_specs(recipe, shapes)
            for n in world_sizes:
                start = time.perf_counter()
                plan = plan_ownership(specs, n)
                s = plan.summary()
                units = sum(len(p.units()) for p in specs if p.locality is not Locality.ELEMENTWISE)
                rows.append({
                    "model": model, "recipe": recipe, "N": n, "units": units,
                    "max/mean load": s["max_over_mean_load"], "lower bound": s["lower_bound_load"],
                    "load ok (<=1.1)": s["max_over_mean_load"] <= 1.1,
                    "max state/rank": s["max_state"], "total/N": s["mean_state"],
                    "total/N + largest block": s["state_bound"],
                    "state ok": s["max_state"] <= s["state_bound"] * (1 + 1e-9),
                    "plan ms": 1e3 * (time.perf_counter() - start),
                })
    return rows


def _mb(x: float) -> str:
    return f"{x / 2 ** 20:,.1f}"


def print_planner(rows: list[dict[str, Any]], plain: bool = False) -> None:
    from distopt.bench.table import render_table

    cols = ["model", "recipe", "N", "units", "max/mean load", "lower bound", "load <= 1.1",
            "max state/rank MiB", "total/N MiB", "total/N + largest MiB", "state ok", "plan ms"]
    body = [[r["model"], r["recipe"], r["N"], r["units"], f"{r['max/mean load']:.3f}", f"{r['lower bound']:.3f}",
             "yes" if r["load ok (<=1.1)"] else "no (bound)" if r["lower bound"] > 1.1 else "NO",
             _mb(r["max state/rank"]), _mb(r["total/N"]), _mb(r["total/N + largest block"]),
             "yes" if r["state ok"] else "NO", f"{r['plan ms']:.0f}"] for r in rows]
    render_table(cols, body, title="ownership plan (modelled state bytes, fp32; load = per-step cost model)",
                 plain=plain)


# ----------------------------------------------------------------------------- measurement (torchrun)

def _worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    import distopt
    from distopt.distributed.zero import ZeroOptimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shapes = MODELS[args.model](layers=args.layers) if args.layers else MODELS[args.model]()
    emb = embedding_names(shapes)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for _, s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for _, s in shapes]
    names = {id(p): n for p, (n, _) in zip(params, shapes)}
    n_params = sum(p.numel() for p in params)
    results: dict[str, Any] = {"model": args.model, "layers": args.layers, "params": n_params, "world_size": world,
                               "recipes": {}}

    def build(recipe: str) -> Any:
        if recipe == "muon":
            groups = [{"params": [p for p in params if names[id(p)] not in emb]},
                      {"params": [p for p in params if names[id(p)] in emb], "use_muon": False}]
            return distopt.create("muon", groups, ns_dtype=torch.float32)
        return distopt.create(recipe, params)

    for recipe in args.recipes.split(","):
        if recipe not in distopt.available():
            results["recipes"][recipe] = {"skipped": "not registered"}
            continue
        unsharded = 0
        if rank == 0:
            opt = build(recipe)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            unsharded = distopt.state_bytes(opt)
            del opt
        dist.barrier()
        zero = ZeroOptimizer(build(recipe), named_parameters=list(zip(names.values(), params)))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        start = time.perf_counter()
        zero.step()
        seconds = time.perf_counter() - start
        mine = {"state_bytes": distopt.state_bytes(zero), "comm": dict(zero.comm), "step_s": seconds,
                "modelled_state": zero.plan.state[rank], "pieces": len(zero.local)}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        results["recipes"][recipe] = {"unsharded_state_bytes": unsharded, "ranks": gathered}
        del zero
        for p in params:
            p.grad = None
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure(model: str = "gpt2-small", layers: int = 0, nproc: int = 2,
            recipes: str = "adamw,muon,lamb,adafactor", timeout: int = 1800) -> tuple[dict[str, Any], list[str]]:
    """Launch the worker under torchrun; returns its report and the exact command."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shard.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "distopt.distributed.bench", "--worker", "--model", model, "--layers", str(layers),
               "--recipes", recipes, "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text()), cmd


def measured_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    n = report["world_size"]
    param_bytes = 4 * report["params"]
    for recipe, r in report["recipes"].items():
        if "skipped" in r:
            continue
        total = r["unsharded_state_bytes"]
        per_rank = [x["state_bytes"] for x in r["ranks"]]
        comm = r["ranks"][0]["comm"]
        steps = max(comm["steps"], 1)
        rows.append({
            "recipe": recipe, "N": n, "unsharded": total, "per_rank": per_rank, "sum": sum(per_rank),
            "max/(total/N)": max(per_rank) / (total / n) if total else float("nan"),
            "gather_bytes": (comm["all_gather_bytes"] + comm["broadcast_bytes"]) / steps,
            "how": "broadcast" if comm["broadcast_bytes"] else "all-gather",
            "flag_bytes": comm["all_reduce_bytes"] / steps, "collectives": comm["collectives"] / steps,
            "param_bytes": param_bytes, "step_s": max(x["step_s"] for x in r["ranks"]),
        })
    return rows


def print_measured(report: dict[str, Any], rows: list[dict[str, Any]], plain: bool = False) -> None:
    from distopt.bench.table import render_table

    cols = ["recipe", "N", "unsharded MiB", "per-rank MiB", "sum/unsharded", "max/(total/N)",
            "params out MiB/step", "via", "collectives/step", "flags B/step", "out/params", "step s"]
    body = [[r["recipe"], r["N"], _mb(r["unsharded"]), " / ".join(_mb(x) for x in r["per_rank"]),
             f"{r['sum'] / r['unsharded']:.4f}" if r["unsharded"] else "-", f"{r['max/(total/N)']:.4f}",
             _mb(r["gather_bytes"]), r["how"], f"{r['collectives']:.0f}", f"{r['flag_bytes']:.0f}",
             f"{r['gather_bytes'] / r['param_bytes']:.4f}",
             f"{r['step_s']:.2f}"] for r in rows]
    title = (f"ZeroOptimizer measured on CPU/gloo: {report['model']}"
             f"{' (' + str(report['layers']) + ' layers)' if report['layers'] else ''}, "
             f"{report['params'] / 1e6:.1f}M fp32 params ({_mb(4 * report['params'])} MiB), one step")
    render_table(cols, body, title=title, plain=plain)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model", default="gpt2-small", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--recipes", default="adamw,muon,lamb,adafactor")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    _worker(args)


if __name__ == "__main__":
    main()

