"""Data-parallel, FSDP2- and ZeRO-3-sharded zeroth-order training with real torchrun (gloo, 2 CPU ranks).

DP: ranks share the seed and all-reduce only the scalars (8 bytes each, counted by the
optimizer's own collective wrapper): 8·n bytes a step for zo_sgd, 8·(n + 3) for zo_sgd_cons;
parameters stay bit-identical across ranks and equal one process on the union of the batches.
FSDP2: parameters are DTensor Shard(0) (uneven rows); each rank perturbs and updates only its
shard, z from global element offsets; the trajectory equals the unsharded one (bit-exact here).
DeepSpeed ZeRO-3: the same with flat partitions (``p.ds_tensor``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zo_worker  # noqa: E402
from launching import run_launch  # noqa: E402


def _torchrun(mode: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "zo_worker.py"), "--mode", mode, "--steps", "20", "--out", str(out)]
    result = run_launch(cmd, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out)


def _single(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    model = zo_worker.build(dtype)
    zo_worker.train(model, name, 20, dtype)
    return [p.detach().clone() for p in model.parameters()]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def test_data_parallel_zo_all_reduces_only_the_scalars(tmp_path: Path) -> None:
    results = _torchrun("dp", tmp_path / "dp.pt")
    for name, res in results.items():
        n, extra = (zo_worker.HPARAMS[name].get("n", 1), 3 if name == "zo_sgd_cons" else 0)
        assert res["bytes"] == 20 * 8 * (n + extra), (name, res["bytes"])
        assert res["calls"] == 20 * (2 if extra else 1)
        assert res["agree"], f"{name}: parameters differ across ranks"
        single = _single(name, torch.float64)
        assert _rel(res["params"], single) < 1e-12, name
        assert not torch.equal(res["params"][0], zo_worker.build(torch.float64)[0].weight)


def test_fsdp2_sharded_zo_equals_unsharded(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.fsdp")
    results = _torchrun("fsdp", tmp_path / "fsdp.pt")
    for name, res in results.items():
        assert res["local_rows"] == [5, 5, 3, 3, 2, 2], res["local_rows"]    # rank 0 of 9, 9, 5, 5, 3, 3 rows
        assert res["agree"]
        assert res["bytes"] == 20 * 8 * (zo_worker.HPARAMS[name].get("n", 1) * (2 if name == "hizoo" else 1))
        single = _single(name, torch.float32)
        dev = _rel(res["params"], single)
        assert dev <= 1e-6, (name, dev)
        assert not torch.equal(res["params"][0], zo_worker.build(torch.float32)[0].weight)


def test_deepspeed_zero3_zo_equals_unsharded(tmp_path: Path) -> None:
    """ZeRO-3 flat partitions (p.ds_tensor, the last one padded): each rank perturbs and updates its
    partition, z keyed by the flat global index; the trajectory equals the unsharded one."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = _torchrun("zero3", tmp_path / "zero3.pt")
    for name, res in results.items():
        assert res["local_rows"] == [32, 5, 23, 3, 8, 2], res["local_rows"]   # ceil(numel / 2) per partition
        assert res["agree"]
        single = _single(name, torch.float32)
        dev = _rel(res["params"], single)
        assert dev <= 1e-6, (name, dev)
        assert not torch.equal(res["params"][0], zo_worker.build(torch.float32)[0].weight)
