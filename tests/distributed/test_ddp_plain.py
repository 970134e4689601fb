"""Real torchrun + DDP (gloo, 2 CPU processes): a distopt optimizer in a plain DDP loop gives
the same parameters as one process that sees the whole batch."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import ddp_train  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launching import run_launch  # noqa: E402


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_ddp_two_ranks_equal_single_process(optimizer: str, tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(ROOT / "examples" / "ddp_train.py"), "--optimizer", optimizer, "--steps", "10", "--out", str(out)]
    result = run_launch(cmd, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp_params = torch.load(out)

    model = ddp_train.build()
    ddp_train.train(model, optimizer, 1e-2, 10)
    for a, b in zip(ddp_params, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    assert not torch.equal(ddp_params[0], ddp_train.build()[0].weight.detach())
