"""Distributed checkpoints (torch.distributed.checkpoint) of ZeRO-sharded state, with resharding.

- 2 ranks save after 5 steps -> the same 2 ranks resume (and via their own state_dict shards)
  -> one plain process loads the 2-rank checkpoint and continues: all equal the uninterrupted
  single-process run of 10 steps;
- one plain process saves -> 2 ranks load it and continue: equal again;
- another recipe, other shapes, a tampered (pickle) metadata file: loud errors.
"""
from __future__ import annotations

import os
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distopt
from distopt.distributed import checkpoint as ckpt
from distopt.distributed.zero import ZeroOptimizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import zero_worker as w  # noqa: E402
from test_zero import TOL, launch  # noqa: E402

RECIPES = w.CKPT_RECIPES


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """The workers run one thread; so must the in-process runs, or matmul sums differ in the last bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def saved_on_two(root: Path) -> dict[str, Any]:
    (root / "two").mkdir()
    return launch(2, "ckpt-save", root / "save2.json", "--dir", str(root / "two"))


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    return {name: w.flat(w.single(name)[0]) for name in RECIPES}


def test_two_ranks_resume_on_two_ranks(saved_on_two: dict[str, Any], root: Path) -> None:
    for rank in saved_on_two["ranks"]:
        for name, r in rank["result"].items():
            assert r["dcp_bitwise"] and r["dcp_resume"] == 0.0, (name, r)
            assert r["shard_resume"] == 0.0, (name, r)


@pytest.mark.parametrize("name", RECIPES)
def test_two_ranks_to_one_process(saved_on_two: dict[str, Any], root: Path, references: dict[str, torch.Tensor],
                                  name: str) -> None:
    final_on_two = torch.load(root / "two" / f"{name}.final.pt", weights_only=True)
    assert w.rel_diff(final_on_two, references[name]) <= TOL
    model = w.build(seed=7)
    opt = w.make(name, model)  # a plain single-process optimizer
    header = ckpt.load(root / "two" / name, opt, model=model)
    assert header["world_size"] == 2 and header["fingerprint"]["recipe"] == name
    assert opt.param_groups[1]["lr"] == w.HPARAMS[name][1]["lr"]
    w.train(model, opt, w.SAVE_AT, w.STEPS)
    assert w.rel_diff(w.flat(model), references[name]) <= TOL
    assert torch.equal(w.flat(model), final_on_two)


@pytest.fixture(scope="module")
def saved_on_one(root: Path) -> Path:
    out = root / "one"
    for name in RECIPES:
        model = w.build()
        opt = w.make(name, model)
        w.train(model, opt, 0, w.SAVE_AT)
        ckpt.save(out / name, opt, model=model)
    return out


def test_one_process_to_two_ranks(saved_on_one: Path, root: Path) -> None:
    report = launch(2, "ckpt-load", root / "load2.json", "--dir", str(saved_on_one))
    for rank in report["ranks"]:
        for name in RECIPES:
            r = rank["result"][name]
            assert r["rel_diff"] <= TOL and r["bitwise"], (name, r)
            assert r["state_bytes"] > 0


def test_in_memory_reshard_into_wrapper(references: dict[str, torch.Tensor]) -> None:
    """get_optimizer_state_dict of one process -> set_optimizer_state_dict into a ZeroOptimizer."""
    model = w.build()
    opt = w.make("muon", model)
    w.train(model, opt, 0, w.SAVE_AT)
    sd = ckpt.get_optimizer_state_dict(opt, model)
    assert all(k.startswith("optim.") for k in sd)
    assert "optim.state.l1.weight.momentum_buffer" in sd and "optim.state.l1.bias.exp_avg.0_40" in sd
    zero = ZeroOptimizer(w.make("muon", model), named_parameters=model)
    ckpt.set_optimizer_state_dict(zero, sd, model)
    w.train(model, zero, w.SAVE_AT, w.STEPS)
    assert torch.equal(w.flat(model), references["muon"])


def test_mismatched_recipe_or_shapes_fail_loudly(saved_on_one: Path) -> None:
    model = w.build()
    with pytest.raises(ValueError, match="saved for recipe 'adamw', loading into 'lion'"):
        ckpt.load(saved_on_one / "adamw", distopt.create("lion", w.groups(model, "lion")), model=model)
    model.mix = torch.nn.Parameter(torch.randn(40, 36))  # same name, other shape
    with pytest.raises(ValueError, match="parameter 'mix': saved shape \\[40, 37\\], here \\[40, 36\\]"):
        ckpt.load(saved_on_one / "adamw", w.make("adamw", model), model=model)
    model = w.build()
    with pytest.raises(ValueError, match="saved locality 'matrix', here 'elementwise'"):  # matrices in AdamW
        ckpt.load(saved_on_one / "muon", distopt.create("muon", [{"params": w.groups(model, "muon")[0]["params"],
                                                                   "use_muon": False}, w.groups(model, "muon")[1]]),
                  model=model)


class _Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("echo pwned > /dev/null",))


def test_metadata_is_not_unpickled_blindly(saved_on_one: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(saved_on_one / "adamw", bad)
    (bad / ".metadata").write_bytes(pickle.dumps(_Exploit()))
    model = w.build()
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        ckpt.load(bad, w.make("adamw", model), model=model)
