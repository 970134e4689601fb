"""ZO-SGD-Cons, the conservative ZO-SGD of ZO-Bench (Zhang et al., "Revisiting Zeroth-Order
Optimization for Memory-Efficient LLM Fine-Tuning: A Benchmark", ICML 2024, ``zo_conserv_step``):
estimate g as MeZO, then evaluate both candidate steps and keep the best of three,

    u = g + wd·θ;   l0 = f(θ),  l1 = f(θ - lr u),  l2 = f(θ + lr u)
    θ <- θ - lr u  if l1 <= l0 and l1 < l2;   θ + lr u  if l2 <= min(l0, l1) (ties as ZO-Bench);
    θ unchanged   otherwise (l0 < l1 and l0 < l2)

so the loss on the step's batch never increases. 2n + 3 forward passes a step. The candidates are
evaluated without writing the parameters (or written and restored exactly, ``in_place``);
data-parallel ranks average l0, l1, l2 (3 more scalars) so they all take the same decision.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor

from distopt.core import Chain, chain, register
from distopt.preconditioners import ApplyLR
from distopt.scenarios import AddWeightDecay
from distopt.zo.estimator import Losses, Probe, ZOEstimate
from distopt.zo.evaluate import InPlace
from distopt.zo.layout import Slot
from distopt.zo.optimizer import ZO_HYPER, ZOOptimizer


class _Candidate:
    """Parameter values after the step with the group's lr times ``factor``."""

    def __init__(self, opt: "ZOSGDCons", probe: Probe, factor: float, states: dict[int, dict]) -> None:
        self.opt, self.probe, self.factor, self.states = opt, probe, factor, states

    def write(self, slot: Slot, rows: slice | Tensor, theta: Tensor, out: Tensor) -> None:
        out.copy_(theta)
        group = self.opt.param_groups[slot.group]
        self.opt.chain_rows({**group, "lr": group["lr"] * self.factor}, slot, self.states[slot.index], rows, out,
                            self.probe)


@register
class ZOSGDCons(ZOOptimizer):
    """Conservative zeroth-order SGD: a step is taken only where it lowers the batch loss."""

    name = "zo_sgd_cons"
    reference = "naive float64 ZO-SGD-Cons loop (ZO-Bench zo_conserv_step) in tests/reference/test_zeroth_order.py"
    hyper = ZO_HYPER
    needs_center = True

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        return chain(ZOEstimate(group["maximize"]), AddWeightDecay(group["weight_decay"]), ApplyLR(group["lr"]))

    def decide(self, closure: Callable[[], Any], slots: list[Slot], states: list[dict], probe: Probe,
               losses: Losses, inplace: InPlace | None) -> float:
        by_index = {s.index: st for s, st in zip(slots, states)}
        l1 = self._evaluate(closure, slots, _Candidate(self, probe, 1.0, by_index), inplace)
        l2 = self._evaluate(closure, slots, _Candidate(self, probe, -1.0, by_index), inplace)
        assert losses.center is not None
        l0, l1, l2 = self._average([losses.center, l1, l2], slots)
        if l1 > l0:
            return 0.0 if l0 < l2 else -1.0
        return 1.0 if l1 < l2 else -1.0
