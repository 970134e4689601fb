"""The ``distopt`` command line: ``list``, ``bench --quick`` and ``bench step --quick``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distopt
from distopt.bench.catalogue import catalogue, state_bytes_per_param
from distopt.bench.step_time import default_shapes, torch_counterpart
from distopt.bench.table import plain_table
from distopt.cli import DEFAULT_SUITE, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def listed() -> list[dict]:
    return catalogue()


def _has_state(name: str) -> bool:
    """Independent of the catalogue: does one plain step leave any non-``step`` tensor state?"""
    p = torch.nn.Parameter(torch.randn(8, 6))
    p.grad = torch.randn(8, 6)
    opt = distopt.create(name, [p])
    try:
        opt.step()
    except Exception:  # noqa: BLE001 - optimizers that need a closure are not judged here
        return False
    return any(isinstance(v, torch.Tensor) and k != "step" for s in opt.state.values() for k, v in s.items())


def test_list_json_covers_registry(capsys, listed):
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(distopt.available())
    for name, row in rows.items():
        assert row["family"] == distopt.get(name).family and row["reference"] == distopt.get(name).reference
        assert row["state_bytes_per_param"] is not None, row.get("error")
        assert row["stages"] and row["stages"] != "?" and row["locality"] in ("elementwise", "tensor", "matrix")
        if _has_state(name):
            assert row["state_bytes_per_param"] > 0, name
    assert rows["sgd"]["state_bytes_per_param"] == 0  # no momentum by default: no buffer
    assert rows["adam"]["state_bytes_per_param"] == 8  # exp_avg + exp_avg_sq in fp32
    assert rows["adamw"]["stages"] == "ΦP" and rows["adam"]["locality"] == "elementwise"


def test_state_bytes_follow_hyperparameters():
    bytes_ = state_bytes_per_param("sgd")
    assert bytes_ == 0
    adam = distopt.get("adam")
    p = torch.nn.Parameter(torch.randn(64, 48))
    p.grad = torch.randn_like(p)
    opt = adam([p], amsgrad=True)
    opt.step()
    assert sum(v.numel() * v.element_size() for k, v in opt.state[p].items() if k != "step") / p.numel() == 12


def test_list_table_and_family(capsys, listed):
    assert main(["list", "--plain"]) == 0
    out = capsys.readouterr().out
    for row in listed:
        assert any(line.split()[:2] == [row["name"], row["family"]] for line in out.splitlines()), row["name"]
    assert main(["list", "--json", "--family", "first_order"]) == 0
    assert {r["family"] for r in json.loads(capsys.readouterr().out)} == {"first_order"}


def test_python_m_distopt_list(listed):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "distopt", "list", "--plain"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    names = {line.split()[0] for line in proc.stdout.splitlines()[3:] if line.strip()}
    assert names == {r["name"] for r in listed}


def test_bench_quick(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--workloads", "mlp_digits", "--budget-scale", "0.5", "--out", str(out),
                 "--no-progress", "--plain", "--jobs", "1", "--optimizers", ",".join(DEFAULT_SUITE) + ",not_an_optimizer"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipped 'not_an_optimizer'" in printed
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    ran = [n for n in DEFAULT_SUITE if n in distopt.available()]
    assert {r["config"]["optimizer"] for r in records} == set(ran)
    train = [r for r in records if r["config"]["kind"] == "train"]
    assert {tuple(r["roles"]) for r in train} == {("tune",), ("eval",)}
    for r in train:  # quick: base lr only, 2 evaluation seeds, 20 steps
        assert r["error"] is None and r["metrics"]["steps"] == 20 and len(r["curves"]["val"]) == 5
        assert r["metrics"]["final_test"] > 0.2, r["config"]  # chance is 0.1
    assert sum("eval" in r["roles"] for r in records) == 2 * len(ran)
    assert all(r["metrics"]["peak_memory_bytes"] > 0 for r in records if r["config"]["kind"] == "memory")
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in ran) and "not_an_optimizer" in report
    if "matplotlib" in sys.modules or __import__("importlib").util.find_spec("matplotlib"):
        assert (out / "curves.png").stat().st_size > 1000


def test_bench_step_quick(capsys):
    assert main(["bench", "step", "--quick", "--plain"]) == 0
    out = capsys.readouterr().out
    ratio_lines = [line for line in out.splitlines() if line.startswith("ratio ")]
    timed = [n for n in ("sgd", "adam", "adamw") if n in distopt.available()]
    for name in timed:
        line = next(line for line in ratio_lines if line.startswith(f"ratio {name}:"))
        assert "distopt/torch-foreach" in line and line.rstrip().endswith("x")
        ratio = float(line.split("distopt/torch-foreach")[1].split("=")[1].split("x")[0])
        assert 1e-3 < ratio < 1e3  # a sanity check: on a loaded 2-core machine one timing can swing 100x


def test_step_helpers():
    shapes = default_shapes(16)
    assert len(shapes) == 20 and shapes[0] == (16, 16) and shapes[-1] == (64, 4)
    assert torch_counterpart("adam") == (torch.optim.Adam, {})
    if "nadamw" in distopt.available() and distopt.get("nadamw").reference.startswith("torch.optim.NAdam("):
        assert torch_counterpart("nadamw") == (torch.optim.NAdam, {"decoupled_weight_decay": True})


def test_plain_table_alignment():
    text = plain_table(("name", "bytes"), [("a", 8.0), ("long_name", 0.25)], title="t")
    lines = text.splitlines()
    assert lines[0] == "t" and lines[1].split() == ["name", "bytes"]
    assert lines[3].endswith("   8") and lines[4].endswith("0.25") and len(lines[3]) == len(lines[4])


def test_missing_extras_raise_with_install_hint(monkeypatch):
    from distopt.bench import require
    from distopt.bench.workloads import load_digits_split

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'pip install "distopt\[bench\]"'):
        require("sklearn.datasets")
    with pytest.raises(ImportError, match="sklearn.datasets"):
        load_digits_split()


def test_table_falls_back_to_plain_without_rich(monkeypatch, capsys):
    from distopt.bench.table import render_table

    monkeypatch.setitem(sys.modules, "rich.table", None)
    render_table(("a", "b"), [("x", 1.5)], title="t")
    assert capsys.readouterr().out.splitlines()[1].split() == ["a", "b"]
