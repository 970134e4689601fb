"""``distopt bench zo --convergence``: steps-to-target of ZO recipes vs AdamW on the example task.

The accounting is checked against the recorded curves (the first evaluation at or below the
target), the target against an independently built model's initial held-out loss, and the
forward-equivalents against the rule (ZO two-sided n=1: 2 closure calls a step; AdamW: 3 a step).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from distopt.bench.zo_convergence import ConvergenceConfig, bench_zo_convergence, summarize  # noqa: E402
from distopt.cli import main  # noqa: E402
from distopt.zo.lm_task import build_task, eval_batch  # noqa: E402

TINY = dict(hidden=16, layers=1, batch=8, eval_examples=32, steps=12, zo_steps=12, evals=6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _first_at_or_below(steps: list[int], losses: list[float], target: float) -> int | None:
    for s, v in zip(steps, losses):
        if v <= target:
            return s
    return None


def test_convergence_accounting_matches_the_curves() -> None:
    cfg = ConvergenceConfig(methods=("adamw", "zo_sgd", "zo_adam"), target_fraction=0.95,
                            lrs={"adamw": (1e-2, 1e-3), "zo_sgd": (1e-3,), "zo_adam": (3e-3,)}, **TINY)
    result = bench_zo_convergence(cfg)
    assert set(result) == {"config", "rule", "targets", "runs", "grid", "summary"}
    assert "0.95" in result["rule"] and len(result["runs"]) == 4 and len(result["grid"]) == 4

    model, _, held_out = build_task(16, 1, 24, seed=0)          # the seed's initial weights, rebuilt
    with torch.no_grad():
        initial = float(model(**eval_batch(held_out, "cpu", 32)).loss)
    target = result["targets"][0]
    assert target == pytest.approx(0.95 * initial, rel=1e-6)

    for run in result["runs"]:
        assert run["step"] == [0, 2, 4, 6, 8, 10, 12] and run["target"] == target
        assert run["loss"][0] == pytest.approx(initial, rel=1e-6)          # same init for every run
        per_step = 3 if run["method"] == "adamw" else 2
        assert run["forward"] == [per_step * s for s in run["step"]]
        assert all(b >= a for a, b in zip(run["seconds"], run["seconds"][1:]))
        expected = _first_at_or_below(run["step"], run["loss"], target)
        assert run["step_to_target"] == expected
        if expected is None:
            assert run["forward_to_target"] is None and run["seconds_to_target"] is None
        else:
            i = run["step"].index(expected)
            assert all(v > target for v in run["loss"][:i]) and run["loss"][i] <= target
            assert run["forward_to_target"] == per_step * expected
            assert run["seconds_to_target"] == run["seconds"][i]

    adamw = [r for r in result["runs"] if r["method"] == "adamw"]
    assert all(r["loss"][-1] < r["loss"][0] for r in adamw)
    fast = next(r for r in adamw if r["lr"] == 1e-2)
    assert fast["loss"][-1] < fast["loss"][0] - 0.3 and fast["step_to_target"] is not None  # learns in 12 steps
    best = {r["method"]: r for r in result["summary"]}
    assert best["adamw"]["lr"] == 1e-2 and best["adamw"]["steps_ratio"] == 1.0
    for cell in result["grid"]:                                             # one seed: the cell is the run
        run = next(r for r in result["runs"] if (r["method"], r["lr"]) == (cell["method"], cell["lr"]))
        assert cell["steps_to_target"] == run["step_to_target"] and cell["final_loss"] == run["loss"][-1]
        assert cell["reached"] == (run["step_to_target"] is not None) and cell["eval_every"] == 2


def _cell(method: str, lr: float, steps: float | None, final: float, fwd_per_step: int) -> dict:
    return {"method": method, "lr": lr, "steps_to_target": steps, "final_loss": final,
            "forward_to_target": None if steps is None else fwd_per_step * steps,
            "seconds_to_target": None if steps is None else steps / 10}


def test_summary_picks_fastest_lr_and_forms_ratios() -> None:
    cells = [_cell("adamw", 1e-3, 40, 1.0, 3), _cell("adamw", 1e-2, 20, 1.2, 3),
             _cell("zo_sgd", 1e-3, 600, 2.0, 2), _cell("zo_sgd", 3e-3, None, 1.5, 2),
             _cell("zo_adam", 1e-3, None, 2.4, 2), _cell("zo_adam", 3e-3, None, 2.2, 2)]
    rows = {r["method"]: r for r in summarize(cells)}
    assert rows["adamw"]["lr"] == 1e-2                    # fewest steps wins over a lower final loss
    assert rows["zo_sgd"]["lr"] == 1e-3 and rows["zo_sgd"]["steps_ratio"] == 30.0
    assert rows["zo_sgd"]["forward_ratio"] == pytest.approx(1200 / 60)
    assert rows["zo_sgd"]["seconds_ratio"] == pytest.approx(30.0)
    assert rows["zo_adam"]["lr"] == 3e-3 and rows["zo_adam"]["steps_ratio"] is None   # none reached: lowest final


def test_cli_convergence_writes_table_json_and_plot(tmp_path: Path, capsys) -> None:
    rc = main(["bench", "zo", "--convergence", "--hidden", "16", "--layers", "1", "--batch", "8", "--steps", "6",
               "--zo-steps", "6", "--evals", "3", "--lrs", "adamw=1e-2", "--lrs", "zo_sgd=1e-3",
               "--methods", "adamw,zo_sgd", "--target-fraction", "0.97", "--out", str(tmp_path), "--quiet",
               "--plain"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "steps ZO/AdamW" in out and "0.97 x the seed's initial held-out loss" in out
    data = json.loads((tmp_path / "zo_convergence.json").read_text())
    assert [r["method"] for r in data["summary"]] == ["adamw", "zo_sgd"]
    assert all(v is None or math.isfinite(v) for r in data["runs"] for v in r["loss"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "zo_convergence.png").stat().st_size > 0


def test_cli_convergence_refuses_unknown_method_and_bad_lrs(capsys) -> None:
    assert main(["bench", "zo", "--convergence", "--methods", "adamw,sgd"]) == 2
    assert "neither 'adamw' nor a zeroth-order recipe" in capsys.readouterr().err
    assert main(["bench", "zo", "--convergence", "--lrs", "zo_sgd"]) == 2
    assert "METHOD=LR" in capsys.readouterr().err
    assert main(["bench", "zo", "--convergence", "--methods", "adamw,zo_sgd", "--lrs", "zo_adam=1e-3"]) == 2
    assert "not among the methods" in capsys.readouterr().err


def test_memory_table_is_still_the_default(tmp_path: Path, capsys) -> None:
    path = tmp_path / "rows.json"
    assert main(["bench", "zo", "--sizes", "tiny", "--batch", "1", "--seq", "8", "--json", str(path), "--quiet",
                 "--plain"]) == 0
    rows = json.loads(path.read_text())
    assert [r["model"] for r in rows] == ["tiny"] and rows[0]["zo_over_inference"] > 0
    assert "target ZO step peak" in capsys.readouterr().out
