"""Distributed DP with real torchrun (2 CPU ranks, gloo): Opacus' DistributedDPOptimizer path via
make_private on DPDDP (hooks, ghost_bk) / DDP (ghost, ghost_bk) modules. At σ = 0 the clipped, summed, averaged
gradient equals the single-process one; with σ > 0 noise is added once (rank 0), so ranks stay
identical and the noise std is σC/B_global, not sqrt(world)·σC/B_global. DP-ZO's scalar too."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("opacus")
pytestmark = pytest.mark.slow  # two torchrun processes: ~15 s of CPU

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "distributed"))
from launching import run_launch  # noqa: E402


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "dp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(out)]
    done = run_launch(cmd, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


FAST = "PrivateDistributedDPOptimizerFastGradientClipping"


@pytest.mark.parametrize("mode,cls", [("hooks", "PrivateDistributedDPOptimizer"), ("ghost", FAST),
                                      ("ghost_bk", FAST), ("ghost_bk_dpddp", FAST)])
def test_sigma_zero_equals_single_process(results: dict, mode: str, cls: str) -> None:
    single = results["single"][mode.split("_dp")[0]]
    for rank in results["ranks"]:
        run = rank[mode]
        assert run["class"] == cls
        assert run["expected_batch_size"] == 4.0  # per worker: 8 / 2
        for a, b in zip(run["grads"], single["grads"]):
            assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)  # float64: in fact far tighter
        for a, b in zip(run["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert run["eps"] == single["eps"]


@pytest.mark.parametrize("mode", ["", "ghost_bk_"])
def test_noise_is_added_once_globally(results: dict, mode: str) -> None:
    r0, r1 = (rank[f"{mode}noisy"] for rank in results["ranks"])
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)  # every rank applied the same noisy gradient
    clean = results["ranks"][0][f"{mode}noisy_clean"]["grads"]
    noise = torch.cat([(a - b).flatten() for a, b in zip(r0["grads"], clean)])
    assert noise.numel() > 6000
    once = 1.0 * 2.0 / 8  # σ C / B_global
    assert abs(float(noise.std()) / once - 1) < 0.05  # twice-added noise would be 41% larger


def test_ghost_bk_refuses_fsdp(results: dict) -> None:
    for rank in results["ranks"]:
        assert "grad_sample_mode='ghost_bk' does not support FSDP modules" in rank["fsdp_ghost_bk"]


def test_dp_zo_scalar_is_all_reduced(results: dict) -> None:
    single = results["single"]["zo"]
    for rank in results["ranks"]:
        assert rank["zo"]["scalar"] == pytest.approx(single["scalar"], rel=1e-12)
        for a, b in zip(rank["zo"]["params"], single["params"]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    r0, r1 = (rank["zo_noisy"] for rank in results["ranks"])
    assert r0["scalar"] == r1["scalar"] != single["scalar"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
