"""The report: analysis of hand-made records, rendering, and ``distopt bench report DIR``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distopt.bench import protocol, report, runner
from distopt.cli import main


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark's runs use: on a busy 2-core machine two OpenMP threads wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _rec(opt: str, lr: float, seed: int, roles: list[str], vals: list[float], test: float, *, budget: int = 30,
         diverged: bool = False, wl: str = "w", metric: str = "accuracy") -> dict:
    steps = [0, 10, 20, 30][: len(vals)]
    return {
        "key": f"{opt}-{lr}-{seed}-{budget}", "roles": roles, "error": None,
        "config": {"optimizer": opt, "workload": wl, "lr": lr, "init_seed": seed, "data_seed": 10_000 + seed,
                   "budget": budget, "kind": "train"},
        "workload": {"name": wl, "metric": metric, "proxy": "test", "failure_value": 0.1, "sensitivity_delta": 0.01},
        "curves": {"step": steps, "val": vals, "time_s": [s / 10 for s in steps]},
        "metrics": {"final_val": vals[-1], "final_test": test, "diverged": diverged, "steps": budget,
                    "state_bytes_per_param": 8.0 if opt == "adamw" else 4.0, "step_overhead": 0.1,
                    "step_time_s": 0.3, "peak_memory_bytes": 2**20},
    }


@pytest.fixture()
def records() -> list[dict]:
    rs = []
    # AdamW: tuned at 1e-3 (tuning grid 1e-4, 1e-3, 1e-2); eval finals 0.80, 0.90, 0.85 -> target 0.85
    rs += [_rec("adamw", lr, 100, ["tune"], [0.1, v], v) for lr, v in ((1e-4, 0.5), (1e-3, 0.86), (1e-2, 0.7))]
    rs += [_rec("adamw", 1e-3, s, ["eval"], v, t) for s, v, t in
           ((0, [0.1, 0.5, 0.7, 0.80], 0.79), (1, [0.1, 0.6, 0.85, 0.90], 0.91), (2, [0.1, 0.5, 0.75, 0.85], 0.84))]
    # lion: faster (hits 0.85 at step 10 on every seed), one diverged tuning point
    rs += [_rec("lion", 1e-4, 100, ["tune"], [0.1, 0.95], 0.95), _rec("lion", 1e-3, 100, ["tune"], [0.1, 0.1], 0.1,
                                                                       diverged=True)]
    rs += [_rec("lion", 1e-4, s, ["eval"], [0.1, 0.9, 0.93, 0.95], 0.94) for s in range(3)]
    rs += [_rec("lion", 1e-4 * f, 100, ["sensitivity"], [0.1, v], v) for f, v in ((0.5, 0.945), (2.0, 0.90))]
    # horizon 3B (seed 0): lion stays ahead
    rs += [_rec("adamw", 1e-3, 0, ["horizon"], [0.1, 0.9], 0.9, budget=90),
           _rec("lion", 1e-4, 0, ["horizon"], [0.1, 0.97], 0.97, budget=90)]
    return rs


def test_analysis_by_hand(records):
    a = report.analyze(records)
    (w,) = a.workloads
    assert w.target == pytest.approx(0.85) and w.higher and w.budget == 30
    rows = {r.optimizer: r for r in w.rows}
    adamw, lion = rows["adamw"], rows["lion"]
    assert [r.optimizer for r in w.rows] == ["lion", "adamw"] and lion.rank == 1 and adamw.rank == 2
    assert adamw.tuned_lr == 1e-3 and not adamw.grid_edge
    assert lion.tuned_lr == 1e-4 and lion.grid_edge  # best point at the edge of its grid
    assert adamw.test_mean == pytest.approx((0.79 + 0.91 + 0.84) / 3)
    assert adamw.test_ci[0] <= adamw.test_mean <= adamw.test_ci[1]
    # AdamW: seed 0 never reaches 0.85, seed 1 at step 20, seed 2 at step 30 -> median 30 (2 of 3 hit)
    assert adamw.hits == 2 and adamw.steps_to_target == 30 and adamw.time_to_target == pytest.approx(3.0)
    assert lion.hits == 3 and lion.steps_to_target == 10 and lion.speedup == pytest.approx(3.0)
    assert adamw.speedup == pytest.approx(1.0)
    # sensitivity of lion: lr 5e-5 (0.945), 1e-4 (0.95), 2e-4 (0.90), 1e-3 (diverged -> 0.1); δ = 0.01 -> 5e-5..1e-4
    assert lion.width == pytest.approx(1.0)
    assert lion.state_bpp == 4.0 and adamw.state_bpp == 8.0 and lion.peak_bytes == 2**20
    assert lion.score_b == pytest.approx(0.95) and lion.score_3b == pytest.approx(0.97)
    assert w.horizon_n == 2 and math.isnan(w.spearman)  # fewer than 3 optimizers: no correlation
    assert a.profile_steps["lion"][0] == 1.0 and a.profile_steps["adamw"][0] == 0.0
    cols, table = report.ranked_rows(w)
    assert table[0][1] == "lion" and table[0][2] == "0.0001*" and table[1][4] == "30 (2/3)"


def test_render_writes_report_and_plots(records, tmp_path, capsys):
    a, files = report.render(records, tmp_path, {"settings": {"suite": "test"}}, plain=True)
    out = capsys.readouterr().out
    assert "lion" in out and "speedup vs AdamW" in out
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | lion | 0.0001* |" in md and "## Overall" in md
    pytest.importorskip("matplotlib")
    for name in ("curves.png", "lr_sensitivity.png", "performance_profiles.png", "memory.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
        assert f"![{name}]({name})" in md


def test_cli_bench_then_report_rerenders(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--workloads", "mlp_digits", "--optimizers", "sgd,not_an_optimizer",
                 "--budget-scale", "0.25", "--out", str(out), "--no-progress", "--plain", "--jobs", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 'not_an_optimizer'" in printed and "added adamw" in printed
    records = report.read_jsonl(out / "results.jsonl")
    assert {r["config"]["optimizer"] for r in records} == {"adamw", "sgd"}
    assert all(r["roles"] and r["environment"]["torch"] for r in records)
    meta = json.loads((out / "suite.json").read_text())
    assert meta["complete"] and meta["settings"]["optimizers"] == ["adamw", "sgd"]
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out), "--plain"]) == 0
    assert "| sgd |" in (out / "report.md").read_text() or "sgd" in (out / "report.md").read_text()
    assert main(["bench", "report", str(tmp_path / "nothing")]) == 2
    # a second identical command reads everything from the cache
    capsys.readouterr()
    assert main(["bench", "--quick", "--workloads", "mlp_digits", "--optimizers", "sgd", "--budget-scale", "0.25",
                 "--out", str(out), "--no-progress", "--plain", "--jobs", "1"]) == 0
    assert "(0 run now," in capsys.readouterr().out


def test_survey_names_are_mapped_or_reported():
    from distopt.bench.search_space import SURVEY_OPTIMIZERS
    from distopt.cli import _suite_optimizers, build_parser

    args = build_parser().parse_args(["bench", "--suite", "survey"])
    notes: list[str] = []
    names = _suite_optimizers(args, notes)
    assert len(SURVEY_OPTIMIZERS) == 23
    for timm_name, name in SURVEY_OPTIMIZERS.items():
        assert name in names or any(repr(timm_name) in n for n in notes), timm_name
    assert names[0] == "adamw" or "adamw" in names


def test_protocol_settings_for_suites():
    from distopt.cli import DEFAULT_SUITE, DEFAULT_WORKLOADS, _suite_settings, build_parser

    notes: list[str] = []
    s = _suite_settings(build_parser().parse_args(["bench"]), notes)
    assert s.optimizers == list(DEFAULT_SUITE) and s.workloads == list(DEFAULT_WORKLOADS)
    assert s.seeds == 3 and s.grid == (0.2, 1.0, 5.0) and s.horizon == 3 and s.self_tuning
    full = _suite_settings(build_parser().parse_args(["bench", "--suite", "full"]), notes)
    assert full.grid is None and len(full.workloads) == 4 and len(full.optimizers) >= 20
    assert protocol.SuiteSettings(suite="x", optimizers=[], workloads=[]).to_json()["seeds"] == 3
    assert runner.base_workload("mlp_digits").budget > 0
