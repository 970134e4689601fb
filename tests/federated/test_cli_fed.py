"""``distopt fed simulate`` / ``distopt bench fed`` argument handling and the results files
(no simulation here: the end-to-end runs are in test_simulation.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("flwr")

from distopt.cli import build_parser, main  # noqa: E402
from distopt.commands.fed import _kv, _pair  # noqa: E402
from distopt.integrations.flower.server import FedRun  # noqa: E402
from distopt.integrations.flower.simulate import backend_config, write_results  # noqa: E402


def test_simulate_arguments_parse():
    args = build_parser().parse_args([
        "fed", "simulate", "--clients", "100", "--rounds", "10", "--partition", "dirichlet:0.5", "--optimizer", "lion",
        "--server-optimizer", "adamw", "--local-steps", "5", "--num-cpus", "2", "--client-cpus", "1", "--out", "x",
        "--seed", "3", "--hparam", "betas=(0.9,0.99)", "--server-hparam", "weight_decay=0.0", "--dp", "1.0:2.0",
    ])
    assert (args.clients, args.rounds, args.partition, args.optimizer, args.server_optimizer) == \
        (100, 10, "dirichlet:0.5", "lion", "adamw")
    assert _kv(args.hparam) == {"betas": (0.9, 0.99)} and _kv(args.server_hparam) == {"weight_decay": 0.0}
    assert _pair(args.dp, ("noise_multiplier", "max_grad_norm"), 1.0) == {"noise_multiplier": 1.0, "max_grad_norm": 2.0}
    assert _pair("0.5", ("a", "b"), 3.0) == {"a": 0.5, "b": 3.0}
    assert build_parser().parse_args(["bench", "fed", "--quick"]).quick


def test_simulate_rejects_bad_settings_before_starting_ray(capsys, tmp_path):
    assert main(["fed", "simulate", "--strategy", "fedfoo", "--out", str(tmp_path)]) == 2
    assert "unknown strategy" in capsys.readouterr().err
    assert main(["fed", "simulate", "--strategy", "krum", "--server-lr", "0.1", "--out", str(tmp_path)]) == 2
    assert main(["fed", "simulate", "--optimizer", "nope", "--out", str(tmp_path)]) == 2


def test_results_json_and_plot(tmp_path):
    run = FedRun(settings={"strategy": "fedavg"}, initial={"accuracy": 0.1},
                 rounds=[{"round": 1, "accuracy": 0.5, "failures": [{"node_id": 3, "partition_id": 1, "reason": "x"}]},
                         {"round": 2, "accuracy": 0.9, "failures": []}],
                 final_arrays={"w": np.arange(3, dtype=np.float32)})
    paths = write_results(run, tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["final_accuracy"] == 0.9 and data["failures"] == [{"node_id": 3, "partition_id": 1, "reason": "x",
                                                                   "round": 1}]
    assert data["final_weights_sha256"] == run.weights_digest() and run.rounds_to_target(0.8) == 2
    assert (tmp_path / "accuracy.png").exists() and len(paths) == 2


def test_backend_config():
    local = backend_config(num_cpus=2, client_cpus=1)
    assert local["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0} and local["init_args"]["num_cpus"] == 2
    cluster = backend_config(ray_address="auto")
    assert cluster["init_args"]["address"] == "auto" and "num_cpus" not in cluster["init_args"]
