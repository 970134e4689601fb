"""FSDP2 and DeepSpeed ZeRO-1/2/3 with real processes (torchrun --standalone, 2 ranks, gloo on
CPU; DeepSpeed with DS_ACCELERATOR=cpu): every recipe of ``sharded_worker.RECIPES`` that is
registered must give, after 10 steps, the parameters of the single-process run to 1e-5 relative
(fp32). One launch per backend runs all recipes. Optional recipes that are not registered are
reported as skipped (pytest skip with the reason), never silently dropped.

Also: what the *plain* shell does on FSDP2 DTensors (recorded, and elementwise recipes must be
exact there), and the refusal of tensor/matrix recipes under plain ``deepspeed.initialize``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import sharded_worker as w  # noqa: E402
from launching import run_launch  # noqa: E402

TOL = 1e-5
HAS_DS = importlib.util.find_spec("deepspeed") is not None


def launch(mode: str, out: Path, timeout: int = 300) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "sharded_worker.py"), mode, "--out", str(out)]
    result = run_launch(cmd, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    errors = [r["error"] for r in report["ranks"] if r["error"]]
    assert not errors, "\n".join(errors)
    return report


BACKENDS = ["fsdp2", "zero1", "zero2", "zero3"]


@pytest.fixture(scope="module", params=BACKENDS)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if request.param != "fsdp2" and not HAS_DS:
        pytest.skip('DeepSpeed is not installed (pip install "distopt[deepspeed]")')
    return launch(request.param, tmp_path_factory.mktemp(request.param) / "report.json")


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_sharded_equals_single_process(run: dict[str, Any], recipe: str) -> None:
    for rank in run["ranks"]:
        res = rank["result"]
        if recipe in res["skipped"]:
            assert recipe in w.OPTIONAL, res["skipped"][recipe]
            pytest.skip(res["skipped"][recipe])
        # FSDP2: "plain" is distopt.create on the sharded model (the shell's DTensor hook),
        # "wrapped" the explicit shard_aware(...) wrapper; both must equal one process
        rows = [res[recipe]["plain"], res[recipe]["wrapped"]] if run["mode"] == "fsdp2" else [res[recipe]]
        for row in rows:
            assert "error" not in row, row
            assert row["moved"] > 1e-3  # the run did train
            assert row["rel_diff"] <= TOL, f"{recipe} under {run['mode']}: rel diff {row['rel_diff']:.2e}"


@pytest.mark.skipif(not HAS_DS, reason="DeepSpeed is not installed")
def test_plain_deepspeed_refuses_matrix_recipes(tmp_path: Path) -> None:
    report = launch("refuse", tmp_path / "report.json")
    for rank in report["ranks"]:
        for key, row in rank["result"].items():
            if row.get("skipped"):
                continue
            if key.startswith("adamw"):
                assert row["raised"] is None, row  # elementwise: exact on flat partitions, allowed
            else:
                assert row["raised"] and "distopt.integrations.deepspeed.initialize" in row["raised"], (key, row)


@pytest.mark.skipif(not HAS_DS, reason="DeepSpeed is not installed")
def test_deepspeed_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    """engine.save_checkpoint / load_checkpoint (ZeRO 1/2/3, 2 ranks) with owner-kept state: the resumed
    run is bitwise the uninterrupted one; the state is refused on another world size or layout."""
    report = launch("ckpt", tmp_path / "report.json", timeout=600)
    for rank in report["ranks"]:
        res = rank["result"]
        assert not res.pop("skipped"), "adamw, muon and shampoo are core recipes"
        assert len(res) == 9
        for key, row in res.items():
            assert row["bitwise"], (key, row["rel_diff"])
            prefix = "subgroup" if key.endswith("/3") else "group"
            assert row["keys"] and all(k[len(prefix):].isdigit() for k in row["keys"]), (key, row["keys"])
            assert row["loaded"] == row["keys"], row  # state_dict() between load and the first step
            assert "saved by rank" in row["refused"] and "distopt.distributed.checkpoint" in row["refused"], row
            assert "holds other parameters" in row["other_layout"], row


@pytest.mark.skipif(not HAS_DS, reason="DeepSpeed is not installed")
def test_deepspeed_offload_optimizer_equals_single_process(tmp_path: Path) -> None:
    """offload_optimizer (cpu) under ZeRO 1/2/3: Muon's owner protocol and AdamW's fragments on the
    offloaded fp32 partitions give the single-process parameters."""
    report = launch("offload", tmp_path / "report.json")
    for rank in report["ranks"]:
        assert len(rank["result"]) == 6
        for key, row in rank["result"].items():
            assert row["moved"] > 1e-3 and row["rel_diff"] <= TOL, (key, row)
