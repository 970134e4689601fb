"""Benchmark runs: complete records, divergence and errors recorded (never raised), the results cache
resuming an interrupted suite, peak-memory counting."""
from __future__ import annotations

import gc
import json
import math

import pytest
import torch

import distopt
from distopt.bench import protocol, runner
from distopt.bench.memory import LiveTensorCounter

TOP = {"key", "config", "workload", "code_version", "environment", "seed", "curves", "metrics", "error", "finished"}
METRICS = {"n_params", "diverged", "diverged_step", "steps", "final_val", "final_test", "test_loss", "state_bytes",
           "state_bytes_per_param", "train_time_s", "step_time_s", "step_overhead", "peak_memory_bytes", "wall_s"}
ENV = {"torch", "python", "distopt", "device", "threads", "git"}


def _spec(opt: str = "adamw", lr: float = 1e-3, seed: int = 0, budget: int = 20, **kw) -> runner.RunSpec:
    return runner.make_spec(opt, "mlp_digits", lr, seed, 10_000 + seed, budget, quick=True, **kw)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread, as the benchmark's runs use: on a busy 2-core machine two OpenMP threads wait on each other."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_record_is_complete_and_json():
    rec = runner.run_one(_spec())
    assert TOP <= set(rec) and METRICS <= set(rec["metrics"]) and ENV <= set(rec["environment"])
    assert rec["error"] is None and rec["metrics"]["diverged"] is False
    assert rec["seed"] == {"init": 0, "data": 10_000}
    assert rec["config"]["optimizer"] == "adamw" and rec["config"]["lr"] == 1e-3 and rec["config"]["budget"] == 20
    c = rec["curves"]
    assert c["step"] == [0, 5, 10, 15, 20]  # the quick budget is 40 steps with eval_every 10: halved
    assert len(c["val"]) == len(c["time_s"]) == len(c["train_loss"]) == 5
    assert c["time_s"] == sorted(c["time_s"]) and c["val"][-1] > c["val"][0]  # learns something in 20 steps
    m = rec["metrics"]
    assert m["steps"] == 20 and m["final_val"] == c["val"][-1] and 0.1 < m["final_test"] <= 1.0
    assert m["state_bytes_per_param"] == 8.0 and m["state_bytes"] == 8 * m["n_params"]
    assert 0.0 < m["step_overhead"] < 1.0 and m["step_time_s"] < m["train_time_s"]
    assert rec["environment"]["torch"] == torch.__version__
    json.dumps(rec)  # plain JSON (no NaN objects, no tensors)


def test_same_seeds_same_run_and_seeds_are_separate():
    a, b = runner.run_one(_spec(budget=10)), runner.run_one(_spec(budget=10))
    assert a["curves"]["val"] == b["curves"]["val"] and a["key"] == b["key"]
    init_only = runner.make_spec("adamw", "mlp_digits", 1e-3, 0, 10_007, 10, quick=True)
    assert runner.cache_key(init_only) != a["key"]
    c = runner.run_one(init_only)
    assert c["curves"]["val"][0] == a["curves"]["val"][0]  # same init: same step-0 evaluation
    assert c["curves"]["val"][1:] != a["curves"]["val"][1:]  # another data order


def test_divergence_is_recorded_not_raised():
    rec = runner.run_one(_spec("sgd", lr=1e6))
    assert rec["error"] is None and rec["metrics"]["diverged"] is True
    assert 1 <= rec["metrics"]["diverged_step"] <= 20
    assert rec["metrics"]["final_val"] == rec["metrics"]["final_test"] == pytest.approx(0.1)  # chance accuracy


def test_errors_are_recorded_not_raised():
    rec = runner.run_one(_spec("adamw", lr=-1.0))
    assert rec["error"].startswith("ValueError") and "lr" in rec["error"]


def test_lr_schedule():
    assert runner.lr_factor(1, 100, "cosine") == pytest.approx(1 / 5)  # 5 % warm-up
    assert runner.lr_factor(5, 100, "cosine") == pytest.approx(1.0)
    assert runner.lr_factor(100, 100, "cosine") == pytest.approx(0.1)
    assert runner.lr_factor(100, 100, "constant") == 1.0


def test_muon_param_groups():
    wl = runner.base_workload("llama_char", quick=True)
    model = wl.build(0)
    hidden, rest = runner.param_groups(model, "muon")
    assert rest["use_muon"] is False
    assert all(p.ndim == 2 for p in hidden["params"])
    assert any(p is model.embed.weight for p in rest["params"]) and any(p is model.head.weight for p in rest["params"])
    assert len(hidden["params"]) == 7 * 2  # wq wk wv wo w1 w2 w3 x 2 blocks


def test_code_version_follows_the_optimizer_source():
    assert runner.code_version("adamw") == runner.code_version("adamw")
    assert runner.code_version("adamw") != runner.code_version("lion")
    mods = runner._module_closure([distopt.get("lion").__module__])
    assert "distopt.preconditioners.sign" in mods and "distopt.optimizers.first_order.adam" not in mods


def _settings(**kw) -> protocol.SuiteSettings:
    base = dict(suite="test", optimizers=["adamw", "sgd"], workloads=["mlp_digits"], seeds=2, grid=(0.5, 1.0),
                sensitivity=(0.5, 1.0), horizon=2, horizon_seeds=1, quick=True, budget_scale=0.25)
    return protocol.SuiteSettings(**{**base, **kw})


def test_interrupted_suite_resumes_from_the_cache(tmp_path):
    cache = runner.Cache(tmp_path / "cache")
    s = _settings()
    partial, summary = protocol.run_protocol(s, cache, progress=False, limit=3)  # "killed" after 3 runs
    assert not summary["complete"] and summary["counts"]["tuning"]["ran"] == 3
    assert len(list((tmp_path / "cache").glob("*.json"))) == 3
    records, summary = protocol.run_protocol(s, cache, progress=False)
    assert summary["complete"]
    assert summary["counts"]["tuning"] == {"cached": 3, "ran": 1, "total": 4}  # only the missing tuning run
    ran = summary["counts"]["evaluation"]["ran"]
    again, summary = protocol.run_protocol(s, cache, progress=False)
    assert summary["counts"]["tuning"]["ran"] == 0 and summary["counts"]["evaluation"]["ran"] == 0
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in records)
    assert ran > 0 and len(list((tmp_path / "cache").glob("*.json"))) == 4 + ran
    roles = {role for r in records for role in r["roles"]}
    assert roles == {"tune", "eval", "sensitivity", "self", "horizon", "memory"}
    for r in records:  # every eval run is at the tuned lr, on the evaluation seeds
        if "eval" in r["roles"]:
            assert r["config"]["lr"] == summary["tuned"][f"{r['config']['optimizer']}|mlp_digits"]
            assert r["config"]["init_seed"] in (0, 1) and r["config"]["data_seed"] == 10_000 + r["config"]["init_seed"]
        if "tune" in r["roles"]:
            assert r["config"]["init_seed"] == protocol.TUNING_REPLICATE
        if "horizon" in r["roles"]:
            assert r["config"]["budget"] == 2 * 10


def test_equal_tuning_budget():
    s = _settings(optimizers=["adamw", "sgd", "lion"], grid=None)
    tune = protocol.tuning_specs(s)
    assert {len(v) for v in tune.values()} == {5}  # the survey's 5-point grid for every optimizer
    base = runner.space("adamw").base_lr
    lrs = sorted(sp.lr for sp in tune[("adamw", "mlp_digits")])
    assert lrs == pytest.approx([0.1 * base, 0.2 * base, base, 5 * base, 10 * base])
    assert {sp.init_seed for sps in tune.values() for sp in sps} == {protocol.TUNING_REPLICATE}


def test_memory_probe_counts_model_state_and_activations():
    rec = runner.run_one(_spec(kind="memory"))
    m = rec["metrics"]
    param_bytes = 4 * m["n_params"]
    assert m["param_bytes"] == param_bytes
    # at least params + grads + Adam's two moments are alive at the peak
    assert m["peak_memory_bytes"] >= 4 * param_bytes and m["state_bytes_per_param"] == 8.0


def test_live_tensor_counter_is_exact():
    with LiveTensorCounter() as c:
        a = torch.zeros(1000)
        b = torch.ones(500, dtype=torch.float64)
        assert c.current == 4000 + 4000
        view = a.view(10, 100)  # a view adds nothing
        assert c.current == 8000
        del b
        gc.collect()
        assert c.current == 4000 and c.peak == 8000
        del view, a
        gc.collect()
        assert c.current == 0


def test_select_lr_prefers_finite_best():
    def rec(lr: float, val: float, div: bool = False) -> dict:
        return {"config": {"lr": lr}, "metrics": {"final_val": val, "diverged": div}, "error": None}

    recs = [rec(0.1, 0.95, div=True), rec(0.01, 0.9), rec(0.001, 0.9), rec(0.03, math.nan)]
    assert runner.select_lr(recs, higher_is_better=True) == 0.001  # tie: smaller lr
    assert runner.select_lr([rec(0.1, 2.0), rec(0.2, 1.5)], higher_is_better=False) == 0.2


def test_parallel_workers_give_the_serial_results(tmp_path):
    specs = [_spec("adamw", budget=10), _spec("sgd", lr=0.05, budget=10)]
    serial, counts = runner.execute(specs, runner.Cache(None), jobs=1, progress=False)
    try:
        parallel, _ = runner.execute(specs, runner.Cache(tmp_path), jobs=2, progress=False)
    finally:
        runner.close_pool()
    assert counts == {"cached": 0, "ran": 2, "total": 2}
    assert [r["key"] for r in parallel] == [r["key"] for r in serial] == [runner.cache_key(s) for s in specs]
    assert [r["curves"]["val"] for r in parallel] == [r["curves"]["val"] for r in serial]
    assert len(list(tmp_path.glob("*.json"))) == 2
