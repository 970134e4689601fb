"""``distopt bench dp``: the command is registered, and one private run spends the ε it was
calibrated for (σ from the target ε over the planned epochs)."""
from __future__ import annotations

import dataclasses
import math

import pytest

pytest.importorskip("opacus")
pytest.importorskip("sklearn")

from distopt.bench import dp  # noqa: E402
from distopt.cli import build_parser  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")


def test_command_is_registered() -> None:
    args = build_parser().parse_args(["bench", "dp", "--quick", "--skip-cost", "--mode", "hooks"])
    assert args.func.__module__ == "distopt.commands.dp"
    assert args.quick and args.skip_cost and args.mode == "hooks"


@pytest.fixture(scope="module")
def split():
    return dp._split_validation(dp.load_digits_split())


@pytest.mark.parametrize("label", ["adamw+bc", "dp-zo"])
def test_private_run_spends_its_target_epsilon(split, label: str) -> None:
    data, val = split
    contender = next(c for c in dp.contenders() if c.label.startswith(label))
    contender = dataclasses.replace(contender, batch_size=None, epochs_factor=1)  # a short run
    settings = dp.Settings(epochs=1, batch_size=256)
    run = dp.train_one(contender, contender.lr, 3.0, data, val, settings, seed=0)
    assert run["sigma"] > 0 and run["steps"] > 0
    assert 0.5 * 3.0 < run["epsilon_spent"] <= 3.0 + 0.01  # Opacus' calibration tolerance
    assert not math.isnan(run["test_acc"])


def test_best_cell_is_chosen_on_validation() -> None:
    records = [
        {"label": "a", "epsilon": 1.0, "lr": 0.1, "val_acc": 0.5, "test_acc": 0.9, "sigma": 2.0, "epsilon_spent": 1.0},
        {"label": "a", "epsilon": 1.0, "lr": 0.2, "val_acc": 0.6, "test_acc": 0.4, "sigma": 2.0, "epsilon_spent": 1.0},
    ]
    best = dp.best_cells(records)
    assert best[("a", 1.0)]["lr"] == 0.2 and best[("a", 1.0)]["test"] == 0.4


def test_cost_modes_parse() -> None:
    args = build_parser().parse_args(["bench", "dp", "--skip-accuracy", "--mode", "ghost_bk", "--cost-repeats", "2"])
    assert args.mode == "ghost_bk" and args.cost_repeats == 2


def test_peak_meter_counts_what_is_allocated_after_start() -> None:
    import torch

    meter = dp._Peak()
    meter.start()
    if not meter.exact:
        pytest.skip("no /proc/self/clear_refs here: the meter falls back to ru_maxrss, whose peak cannot be reset")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    assert 60 * 2**20 < meter.peak() < 200 * 2**20
    meter.start()  # the peak is reset: the freed block does not count again
    assert meter.peak() < 32 * 2**20


def test_cost_rows_for_every_mode_and_the_hooks_skip(capsys) -> None:
    settings = dp.Settings(cost_steps=2, cost_repeats=1)
    rows = dp.cost(settings, workloads=[dp.CostWorkload("digits_mlp", 64, "")])
    assert [r["mode"] for r in rows] == list(dp.COST_MODES)
    for r in rows:
        assert r["workload"] == "digits_mlp" and r["step_ms"] >= r["fwd_bwd_ms"] > 0 and r["peak_mb"] > 0
        assert (r["noise_ms"] > 0) == (r["mode"] != "non-private")
    skipped = dp.cost(settings, modes=("hooks",), workloads=[dp.CostWorkload("wide_mlp", 256, "")])
    assert skipped[0]["skipped"].startswith("per-sample gradients need 9.6 GiB")
    dp.print_cost(rows + skipped, plain=True)
    out = capsys.readouterr().out
    assert "ghost_bk" in out and "skipped" in out and "memory vs np" in out
