"""The Flower app of ``examples/federated_app`` in deployment mode, with Flower's real processes on
localhost: a ``flower-superlink --insecure``, two ``flower-supernode --insecure`` (node configs
``partition-id=K num-partitions=2``, the keys the app's ClientApp reads), and
``flwr run <app> <connection> --run-config ... --stream`` through a connection in
``$FLWR_HOME/config.toml`` (helper: ``flower_deployment.py``, free ports throughout).

- the run finishes (``flwr run`` exits 0, ``flwr ls`` reports ``finished:completed``) and the
  ServerApp's ``results.json`` holds 2 rounds in which both SuperNodes replied (partition ids 0
  and 1: each id exists only in one SuperNode's ``--node-config``), with no failures and a
  finite accuracy above chance (10 digit classes) and above the initial model's;
- the deployed run computes exactly the simulated one: same final weights (SHA-256 over the
  arrays) and accuracies as :func:`distopt.federated.simulate` with the same settings on Flower's
  Ray runtime, which the other federated tests cover.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr")

from flower_deployment import Deployment, executable  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

APP = Path(__file__).resolve().parents[2] / "examples" / "federated_app"
SETTINGS = dict(rounds=2, local_steps=5, optimizer="sgd", lr=0.3, seed=0, batch_size=32)
RUN_CONFIG = (f"num-server-rounds={SETTINGS['rounds']} local-steps={SETTINGS['local_steps']} "
              f"optimizer='{SETTINGS['optimizer']}' lr={SETTINGS['lr']} seed={SETTINGS['seed']} "
              f"batch-size={SETTINGS['batch_size']} strategy='fedavg' partition='iid' min-nodes=2 fraction-train=1.0")
RUN_TIMEOUT_S = 300  # a healthy run takes ~1 min on 2 busy cores


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    missing = [n for n in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr") if not executable(n)]
    if missing:
        pytest.skip(f"Flower executables not found: {missing}")
    root = tmp_path_factory.mktemp("flower-deployment")
    results = root / "results"
    dep = Deployment(root, [f"partition-id={k} num-partitions=2" for k in range(2)])
    start = time.monotonic()
    try:
        dep.start()
        try:
            run = dep.flwr("run", str(APP), dep.connection, "--run-config", f"{RUN_CONFIG} results-dir='{results}'",
                           "--stream", timeout=RUN_TIMEOUT_S)
            listing = dep.flwr("ls", dep.connection, "--format", "json", timeout=60)
        except Exception as err:  # a timeout: show what the processes said
            pytest.fail(f"{err!r}\n{dep.logs()}")
        yield SimpleNamespace(run=run, listing=listing, results=results, logs=dep.logs(),
                              wall_s=time.monotonic() - start)
    finally:
        dep.stop()


def _results(deployed) -> dict:
    path = deployed.results / "results.json"
    assert path.exists(), f"no {path}\n{deployed.run.stdout[-3000:]}\n{deployed.run.stderr[-3000:]}\n{deployed.logs}"
    return json.loads(path.read_text())


def test_deployed_run_finishes_with_both_supernodes(deployed):
    run, where = deployed.run, f"\n{deployed.run.stdout[-3000:]}\n{deployed.run.stderr[-3000:]}\n{deployed.logs}"
    assert run.returncode == 0 and "Successfully started run" in run.stdout, where
    runs = json.loads(deployed.listing.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], (runs, where)
    data = _results(deployed)
    assert data["settings"]["num_rounds"] == 2 and data["settings"]["min_available_nodes"] == 2
    rounds = data["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert (r["sampled"], r["received"], r["failures"]) == (2, 2, []), r
        assert sorted(r["partitions"]) == [0, 1], r  # one reply from each SuperNode
        assert r["uplink_bytes_total"] > 0
    accuracy = [r["accuracy"] for r in rounds]
    assert all(math.isfinite(a) for a in accuracy) and data["final_accuracy"] == accuracy[-1]
    assert accuracy[-1] > 0.1 and accuracy[-1] > data["initial"]["accuracy"], (data["initial"], accuracy)
    print(f"deployment: {deployed.wall_s:.1f} s from SuperLink start to `flwr ls`, accuracy {accuracy}")


def test_deployed_run_equals_the_simulation(deployed):
    """Same apps, same seeds: the deployment's global model is bit-identical to Flower's simulation."""
    from distopt.federated import DigitsTask, simulate

    data = _results(deployed)
    sim = simulate(DigitsTask(partition="iid", seed=SETTINGS["seed"], batch_size=SETTINGS["batch_size"]), clients=2,
                   rounds=SETTINGS["rounds"], strategy="fedavg", optimizer=SETTINGS["optimizer"],
                   local_steps=SETTINGS["local_steps"], hparams={"lr": SETTINGS["lr"]}, seed=SETTINGS["seed"],
                   num_cpus=2, client_cpus=1)
    assert sim.weights_digest() == data["final_weights_sha256"]
    assert sim.accuracy == [r["accuracy"] for r in data["rounds"]]
