"""Hugging Face Accelerate with distopt optimizers, 2 CPU processes (gloo), launched with the real
``accelerate launch`` and the repository's configs in ``launchers/accelerate/``:

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

for DDP (``multi_cpu_ddp.yaml``; the optimizer as is and wrapped in ``ZeroOptimizer``), FSDP2
(``fsdp2.yaml``, ``fsdp_version: 2``; the optimizer as is) and the DeepSpeed plugin
(``deepspeed_zero2.yaml``, ``deepspeed_zero3.yaml``; the optimizer passed as
``distopt.integrations.deepspeed.wrap(opt, model)``, which is how a tensor/matrix recipe is made
exact when Accelerate calls ``deepspeed.initialize`` itself). After STEPS steps on the prepared
(sharded) dataloader the parameters must equal a single-process run on the whole batch to 1e-5
relative (fp32) for adamw, muon, lamb and shampoo. Without ``wrap``, muon under the DeepSpeed
plugin must raise at its first step. One launch per config runs every recipe
(see accelerate_worker.py).

Flags added to the configs on the command line (the files are written for GPU nodes):
``--num_processes 2``; ``--mixed_precision no`` (the configs say bf16; the contract is checked in
fp32); FSDP2: ``--fsdp_transformer_layer_cls_to_wrap Block`` (the config's
TRANSFORMER_BASED_WRAP otherwise looks for a transformers model's ``_no_split_modules``); DDP:
``--multi_gpu``, which only selects Accelerate's torchrun-style launcher: with
``distributed_type: MULTI_CPU`` alone, ``accelerate launch`` starts one process and expects
mpirun or one launch per node. The worker sets the process-group backend to gloo and, for FSDP2
on a CPU-only machine, works around Accelerate enabling FSDP only on GPU-like devices (see
accelerate_worker.py's docstring). DeepSpeed needs ``DS_ACCELERATOR=cpu``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIGS = ROOT / "launchers" / "accelerate"
sys.path.insert(0, str(HERE))
import accelerate_worker as w  # noqa: E402
from launching import run_launch  # noqa: E402

TOL = 1e-5
HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
HAS_DS = importlib.util.find_spec("deepspeed") is not None

#: run id -> (worker mode, config file, extra accelerate-launch flags)
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "ddp": ("ddp", "multi_cpu_ddp.yaml", ["--multi_gpu"]),
    "fsdp2": ("fsdp2", "fsdp2.yaml", ["--mixed_precision", "no", "--fsdp_transformer_layer_cls_to_wrap", "Block"]),
    "deepspeed_zero2": ("deepspeed", "deepspeed_zero2.yaml", ["--mixed_precision", "no"]),
    "deepspeed_zero3": ("deepspeed", "deepspeed_zero3.yaml", ["--mixed_precision", "no"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(run_id: str, out: Path, timeout: int = 300) -> dict[str, Any]:
    mode, config, extra = RUNS[run_id]
    assert (CONFIGS / config).is_file(), f"missing Accelerate config {CONFIGS / config}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
           "ACCELERATE_LOG_LEVEL": "error"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()), *extra,
           str(HERE / "accelerate_worker.py"), mode, "--out", str(out)]
    result = run_launch(cmd, env=env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, " ".join(cmd) + "\n" + result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    errors = [r["error"] for r in report["ranks"] if r["error"]]
    assert not errors, "\n".join(errors)
    return report


@pytest.fixture(scope="module", params=list(RUNS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not HAS_ACCELERATE:
        pytest.skip('Accelerate is not installed (pip install "distopt[hf]")')
    if RUNS[request.param][0] == "deepspeed" and not HAS_DS:
        pytest.skip('DeepSpeed is not installed (pip install "distopt[deepspeed]")')
    report = launch(request.param, tmp_path_factory.mktemp(request.param) / "report.json")
    report["run_id"] = request.param
    return report


@pytest.mark.parametrize("recipe", w.RECIPES)
def test_prepare_equals_single_process(run: dict[str, Any], recipe: str) -> None:
    for rank in run["ranks"]:
        res = rank["result"]
        if recipe in res["skipped"]:
            assert recipe in w.OPTIONAL, res["skipped"][recipe]
            pytest.skip(res["skipped"][recipe])
        for how, row in res[recipe].items():
            assert "error" not in row, f"{recipe}/{how} under {run['run_id']}: {row['error']}\n{row['traceback']}"
            assert row["moved"] > 1e-3, row  # the run did train
            assert row["rel_diff"] <= TOL, f"{recipe}/{how} under {run['run_id']}: rel diff {row['rel_diff']:.2e}"


def test_backend_is_the_configured_one(run: dict[str, Any]) -> None:
    res = run["ranks"][0]["result"]
    expected = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    assert res["distributed_type"].endswith(expected[run["run_id"]])
    if run["run_id"] == "fsdp2":
        assert res["fsdp_version"] == 2
    if run["run_id"].startswith("deepspeed"):
        assert res["zero_stage"] == int(run["run_id"][-1])
        # the worker clipped the reference with the config's gradient_clipping (DeepSpeed clips inside the engine)
        assert res["gradient_clipping"] > 0
        # without distopt.integrations.deepspeed.wrap, a matrix recipe refuses instead of stepping wrongly
        assert res["refuse"]["raised"] and "distopt.integrations.deepspeed" in res["refuse"]["raised"], res["refuse"]
