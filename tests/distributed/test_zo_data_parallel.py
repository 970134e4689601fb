"""Data-parallel zeroth-order training through DDP, the Hugging Face ZOTrainer, DeepSpeed and
Accelerate: 2 CPU ranks (gloo), real torchrun / ``accelerate launch`` (worker: zo_dp_worker.py).

Ranks share the seed, evaluate their own half of every batch and all-reduce only the n float64
scalars: over the 10 steps the optimizer's counter says 10·8·n bytes (zo_sgd, n = 2) or
10·8·(1 + 3) in 2 calls a step (zo_sgd_cons), and the torch profiler's record of every gloo
collective issued while training (independent of that counter) shows exactly those all-reduces —
no gradient all-reduce, so a DDP comm hook counts no bucket (a control backward shows that the
hook and the profiler do see a gradient all-reduce). Parameters are bit-identical across ranks,
moved, and equal one process on the union of the batches: ≤ 1e-12 relative in float64 (DDP,
ZOTrainer, Accelerate, DeepSpeed ZeRO-0). ZeRO-3 partitions only fp16/bf16/fp32 parameters, so
it runs in float32 (losses summed in float64) and the reference forwards the union in the ranks'
two halves: float32 matmul rounding depends on the batch size, and the finite difference divides
it by 2·eps (1.4e-6 relative after 10 steps against a whole-batch forward; bit-exact against the
halves here), compared ≤ 1e-6 (a last-bit float64 difference of the averaged scalar may flip a
float32 rounding). ZeRO-1/2 with a zeroth-order recipe are refused
(distopt.integrations.deepspeed: no gradients to partition, and DeepSpeed's fp32 master copy would
never see the step).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distopt

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
import zo_dp_worker as w  # noqa: E402
import zo_worker  # noqa: E402
from launching import run_launch  # noqa: E402

STEPS = w.STEPS
HAS = {m: importlib.util.find_spec(m) is not None for m in ("deepspeed", "accelerate", "transformers")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(mode: str, out: Path) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ACCELERATE_LOG_LEVEL": "error",
           "PYTHONWARNINGS": "ignore"}
    worker = [str(HERE / "zo_dp_worker.py"), mode, "--out", str(out)]
    if mode == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launchers" / "accelerate" / "multi_cpu_ddp.yaml"), "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(_free_port()), *worker]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
    result = run_launch(cmd, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAS["transformers"]:
        pytest.skip('transformers is not installed (pip install "distopt[hf]")')
    return _launch("ddp", tmp_path_factory.mktemp("zo_ddp") / "r.pt")


def reference(name: str, dtype: torch.dtype, chunks: int = 1, **hp: Any) -> list[torch.Tensor]:
    """One process, the whole batch each step (forwarded in ``chunks`` equal pieces whose losses are
    averaged: the same function of the parameters)."""
    model = zo_worker.build(dtype)
    opt = distopt.create(name, model.parameters(), **{**zo_worker.HPARAMS[name], **hp})
    for t in range(STEPS):
        x, y = zo_worker.batch(t, dtype)
        opt.step(lambda: sum(w.loss_fn(model, a, b) for a, b in zip(x.chunk(chunks), y.chunk(chunks))) / chunks)
    return [p.detach().clone() for p in model.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max()).item() for x, y in zip(a, b))


def expected_comm(name: str) -> tuple[int, int]:
    """(bytes, calls) of ``STEPS`` steps: n float64 scalars a step; zo_sgd_cons also averages its
    three candidate losses in a second all-reduce."""
    n = zo_worker.HPARAMS[name].get("n", 1)
    return (STEPS * 8 * (n + 3), 2 * STEPS) if name == "zo_sgd_cons" else (STEPS * 8 * n, STEPS)


def check_run(name: str, res: dict[str, Any], ref: list[torch.Tensor], tol: float) -> None:
    nbytes, calls = expected_comm(name)
    assert (res["bytes"], res["calls"]) == (nbytes, calls), (name, res["bytes"], res["calls"])
    assert res["agree"], f"{name}: parameters differ across ranks"
    dev = _rel(res["params"], ref)
    assert dev <= tol, (name, dev)
    start = [p.detach() for p in zo_worker.build(ref[0].dtype).parameters()]
    assert _rel(res["params"], start) > 1e-3, f"{name}: parameters did not move"


def check_wire_is_scalars(name: str, rec: dict[str, Any]) -> None:
    """Everything that crossed the process group while training was the optimizer's scalars."""
    nbytes, calls = expected_comm(name)
    assert {op for op, _ in rec["ops"]} == {"gloo:all_reduce"}, rec["ops"]
    assert (rec["bytes"], rec["calls"]) == (nbytes, calls), (name, rec["bytes"], rec["calls"])


def check_all_reduces_are_scalars(rec: dict[str, Any]) -> None:
    """Every all-reduce on the wire was zo_sgd's n scalars, once a step (other collectives may exist)."""
    reduces = [size for op, size in rec["ops"] if op == "gloo:all_reduce"]
    assert reduces == [8 * zo_worker.HPARAMS["zo_sgd"]["n"]] * STEPS, rec["ops"]


def check_shards(firsts: list[list[float]]) -> None:
    """Rank r's micro-batch t was rows [r·B/2, (r+1)·B/2) of global batch t."""
    per = zo_worker.BATCH // len(firsts)
    for r, seen in enumerate(firsts):
        assert seen == [float(zo_worker.batch(t, torch.float64)[0][r * per, 0]) for t in range(STEPS)], r


# ----------------------------------------------------------------------------- DDP and ZOTrainer
@pytest.mark.parametrize("name", w.NAMES)
def test_ddp_all_reduces_only_the_scalars(ddp: dict[str, Any], name: str) -> None:
    res = ddp[name]
    check_run(name, res, reference(name, torch.float64), 1e-12)
    check_wire_is_scalars(name, res["wire"])
    assert res["grad_buckets"] == 0


def test_ddp_counters_see_a_gradient_all_reduce(ddp: dict[str, Any]) -> None:
    """The control: one backward through the same DDP module is seen by the hook and the profiler."""
    ctrl = ddp[w.NAMES[0]]["control"]
    numel = sum(p.numel() for p in zo_worker.build(torch.float64).parameters())
    assert ctrl["grad_buckets"] == 1
    assert ctrl["wire"]["ops"] == [("gloo:all_reduce", 8 * numel)]


def test_zo_trainer_under_torchrun(ddp: dict[str, Any]) -> None:
    """ZOTrainer: the Trainer wraps the model in DDP itself; the recipe averages over the default
    group; the Trainer's own collectives (DDP's initial parameter broadcast, its bookkeeping
    all-gathers) are no all-reduce: the only all-reduces are the scalars."""
    res = ddp["trainer"]
    assert res["model"] == "DistributedDataParallel" and res["process_group"] == "True"
    check_run("zo_sgd", res, reference("zo_sgd", torch.float64), 1e-12)
    check_all_reduces_are_scalars(res["wire"])
    check_shards(res["firsts"])


# ----------------------------------------------------------------------------- DeepSpeed
@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAS["deepspeed"]:
        pytest.skip('DeepSpeed is not installed (pip install "distopt[deepspeed]")')
    return _launch("deepspeed", tmp_path_factory.mktemp("zo_ds") / "r.pt")


@pytest.mark.parametrize("name", w.NAMES)
def test_deepspeed_zero0_all_reduces_only_the_scalars(ds: dict[str, Any], name: str) -> None:
    res = ds[f"{name}/stage0"]
    assert res["group_is_engine_dp"] and res["dtype"] == "torch.float64"
    check_run(name, res, reference(name, torch.float64), 1e-12)
    check_wire_is_scalars(name, res["wire"])


def test_deepspeed_zero3_data_parallel(ds: dict[str, Any]) -> None:
    """Partitioned parameters and split batches: the scalars are still the only all-reduce (ZeRO-3
    all-gathers the parameters for each forward)."""
    res = ds["zo_sgd/stage3"]
    assert res["group_is_engine_dp"] and res["dtype"] == "torch.float32"
    check_run("zo_sgd", res, reference("zo_sgd", torch.float32, chunks=2), 1e-6)
    check_all_reduces_are_scalars(res["wire"])
    assert any(op == "gloo:all_gather" for op, _ in res["wire"]["ops"])


def test_deepspeed_refuses_what_cannot_work(ds: dict[str, Any]) -> None:
    ref = ds["refusals"]
    for stage in (1, 2):
        assert ref[f"stage{stage}"] and f"ZeRO stage {stage} is not supported" in ref[f"stage{stage}"], ref
    assert ref["plain_zero2"] and "distopt.integrations.deepspeed.initialize" in ref["plain_zero2"], ref
    assert ref["wrap"] and "zeroth-order" in ref["wrap"], ref


def test_zo_config_check() -> None:
    pytest.importorskip("deepspeed")
    from distopt.integrations.deepspeed import check_zo_config

    assert check_zo_config({"zero_optimization": {"stage": 0}}) == 0
    assert check_zo_config({}) == 0
    assert check_zo_config({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}) == 3
    with pytest.raises(ValueError, match="persistence_threshold"):
        check_zo_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="'optimizer' section"):
        check_zo_config({"optimizer": {"type": "Adam"}})


# ----------------------------------------------------------------------------- Accelerate
@pytest.fixture(scope="module")
def acc(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAS["accelerate"]:
        pytest.skip('Accelerate is not installed (pip install "distopt[hf]")')
    return _launch("accelerate", tmp_path_factory.mktemp("zo_acc") / "r.pt")


@pytest.mark.parametrize("name", w.NAMES)
def test_accelerate_prepare_all_reduces_only_the_scalars(acc: dict[str, Any], name: str) -> None:
    """accelerator.prepare(model, zo, loader): DDP model, AcceleratedOptimizer forwarding the closure,
    each rank its shard of every batch of the prepared loader."""
    assert acc["distributed_type"].endswith("MULTI_CPU")
    res = acc[name]
    assert (res["ddp"], res["optimizer"], res["steps"]) == (True, "AcceleratedOptimizer", STEPS)
    check_shards(res["firsts"])
    check_run(name, res, reference(name, torch.float64), 1e-12)
    check_wire_is_scalars(name, res["wire"])
