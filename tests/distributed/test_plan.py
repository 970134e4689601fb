"""Ownership plan (pure, no processes): coverage invariants, balance targets on GPT-2 small and
Llama-3.2-1B shapes, per-parameter locality read from the recipes, hooks, fingerprints."""
from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

import distopt
from distopt.core import Chain, DistOptimizer, Hyper, Locality, chain
from distopt.core.operator import Operator, Stage
from distopt.distributed.bench import PLAN_RECIPES, plan_specs, planner_rows
from distopt.distributed.plan import (
    BlockSpec, ParamSpec, _water_level, check_plan, newton_schulz_cost, plan_ownership, shampoo_blocks,
)
from distopt.distributed.shapes import MODELS, embedding_names, gpt2_small_shapes, llama_1b_shapes
from distopt.distributed.specs import group_defaults, param_locality, recipe_specs
from distopt.preconditioners import ApplyLR


def test_shape_lists_match_the_real_models() -> None:
    assert sum(math.prod(s) for _, s in gpt2_small_shapes()) == 124_439_808
    assert sum(math.prod(s) for _, s in llama_1b_shapes()) == 1_235_814_400
    assert embedding_names(gpt2_small_shapes()) == {"transformer.wte.weight", "transformer.wpe.weight"}


def _random_specs(rng: random.Random, k: int) -> list[ParamSpec]:
    out = []
    for i in range(k):
        shape = tuple(rng.choice([1, 3, 7, 64, 65, 130, 300]) for _ in range(rng.choice([0, 1, 2, 2, 3])))
        if math.prod(shape) > 100_000:
            shape = shape[:2]
        loc = rng.choice(list(Locality))
        blocks: tuple[BlockSpec, ...] = ()
        if loc is not Locality.ELEMENTWISE and rng.random() < 0.5 and len(shape) >= 1:
            blocks = tuple(BlockSpec(b, rng.random() * 10, rng.random() * 100) for b in shampoo_blocks(shape, 64))
        out.append(ParamSpec(f"p{i}", shape, loc, cost=rng.random() * math.prod(shape),
                             state_bytes=rng.choice([0, 4, 8]) * math.prod(shape), blocks=blocks))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
def test_every_element_and_block_owned_exactly_once(n: int) -> None:
    rng = random.Random(n)
    for _ in range(20):
        specs = _random_specs(rng, rng.randint(1, 30))
        plan = plan_ownership(specs, n, align=16)
        check_plan(plan)
        s = plan.summary()
        assert s["max_state"] <= s["state_bound"] * (1 + 1e-9) + 1e-6
        assert abs(sum(plan.state) - sum(p.total_state for p in specs)) <= 1e-6 * (1 + sum(plan.state))
        for pc in plan.pieces:  # cuts inside a param land on multiples of align
            if pc.is_slice:
                assert pc.start % 16 == 0 and (pc.stop % 16 == 0 or pc.stop == specs[pc.param].numel)
                assert 0 <= pc.rank < n


def test_water_level_is_exact() -> None:
    shares = _water_level([5.0, 0.0, 2.0, 9.0], 10.0)
    assert shares == pytest.approx([2 / 3, 17 / 3, 11 / 3, 0.0])  # level 17/3
    assert _water_level([1.0, 1.0], 0.0) == [0.0, 0.0]


def test_elementwise_state_split_evenly() -> None:
    specs = plan_specs("adamw", gpt2_small_shapes())
    for n in (2, 8, 64):
        plan = plan_ownership(specs, n)
        s = plan.summary()
        assert s["max_over_mean_load"] <= 1.001
        assert s["max_state"] - s["mean_state"] <= 64 * 8  # one align chunk of AdamW state


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("recipe", PLAN_RECIPES)
def test_balance_targets(model: str, recipe: str) -> None:
    """max/mean load <= 1.1 wherever whole-block ownership allows it (lower bound <= 1.1; else
    within 5% of the bound), and per-rank state <= total/N + one largest block, N = 2, 8, 64."""
    for row in planner_rows([model], (2, 8, 64), [recipe]):
        assert row["state ok"], row
        if row["lower bound"] <= 1.1:
            assert row["max/mean load"] <= 1.1, row
        else:
            assert row["max/mean load"] <= 1.05 * row["lower bound"], row


def test_gpt2_muon_on_64_ranks_is_bounded_by_its_48_matrices() -> None:
    row = planner_rows(["gpt2-small"], (64,), ["muon"])[0]
    assert row["units"] == 48 and row["lower bound"] > 1.5  # fewer matrices than ranks
    assert row["max/mean load"] == pytest.approx(row["lower bound"], rel=1e-4)  # LPT reaches the bound


def test_per_param_locality_from_the_recipes() -> None:
    muon = distopt.get("muon")
    g = group_defaults(muon)
    assert param_locality(muon, g, (768, 3072)) is Locality.MATRIX
    assert param_locality(muon, g, (64, 3, 3, 3)) is Locality.MATRIX
    assert param_locality(muon, g, (768,)) is Locality.ELEMENTWISE
    assert param_locality(muon, g, ()) is Locality.ELEMENTWISE
    assert param_locality(muon, group_defaults(muon, use_muon=False), (768, 3072)) is Locality.ELEMENTWISE
    assert param_locality(distopt.get("adamw"), group_defaults(distopt.get("adamw")), (8, 8)) is Locality.ELEMENTWISE
    assert param_locality(distopt.get("lamb"), group_defaults(distopt.get("lamb")), (8,)) is Locality.TENSOR
    specs = recipe_specs(muon, [("w", (64, 32)), ("b", (64,))])
    assert specs[0].cost == newton_schulz_cost((64, 32)) and specs[0].state_bytes == 64 * 32 * 4  # momentum
    assert specs[1].state_bytes == 64 * 8  # AdamW's two buffers


class _Scale(Operator):
    stage = Stage.P

    def update(self, updates: list[torch.Tensor], ctx: Any) -> list[torch.Tensor]:
        return updates


class _RouteByNdim(Operator):
    """A router whose branches are both elementwise but *differ*: a flat slice of a matrix would
    take the vector branch, so a matrix must not be sliced."""

    stage = Stage.P

    def __init__(self) -> None:
        self.a, self.b = chain(_Scale(), ApplyLR()), chain(ApplyLR())

    def _branch(self, p: torch.Tensor) -> Chain:
        return self.a if p.ndim >= 2 else self.b


class _Routed(DistOptimizer):
    name = "routed_stub"
    family = "first_order"
    hyper = {"lr": Hyper(0.1)}

    @classmethod
    def recipe(cls, group: Any) -> Chain:
        return chain(_RouteByNdim())


def test_router_that_changes_branch_on_flattening_keeps_matrices_whole() -> None:
    g = group_defaults(_Routed)
    assert param_locality(_Routed, g, (4, 5)) is Locality.TENSOR
    assert param_locality(_Routed, g, (20,)) is Locality.ELEMENTWISE


def test_fingerprint_is_world_size_independent_and_hash_is_not() -> None:
    specs = plan_specs("muon", gpt2_small_shapes(layers=2))
    a, b = plan_ownership(specs, 2), plan_ownership(specs, 8)
    assert a.fingerprint() == b.fingerprint()
    assert a.layout_hash() != b.layout_hash()
    assert a.layout_hash() == plan_ownership(specs, 2).layout_hash()


def test_invalid_world_size() -> None:
    with pytest.raises(ValueError, match="world_size"):
        plan_ownership([], 0)


def test_bench_shard_command_prints_the_planner_table(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from distopt.cli import main

    assert main(["bench", "shard", "--no-measure", "--plain", "--world-sizes", "2,64",
                 "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "ownership plan" in out and "shampoo-like" in out and "llama-1b" in out
    assert "no (bound)" in out  # GPT-2 + Muon on 64 ranks: 48 matrices
    import json

    rows = json.loads((tmp_path / "t.json").read_text())["planner"]
    assert len(rows) == 2 * 3 * 2 and all(r["state ok"] for r in rows)
