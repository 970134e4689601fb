"""Adam-mini (Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More",
arXiv:2406.16793, 2024, Algorithm 1): AdamW with one second-moment scalar per parameter block.

    m   <- β1 m + (1 - β1) g                                  (full size)
    v_b <- β2 v_b + (1 - β2) mean_{i ∈ b}(g_i²)               (one scalar per block b)
    p   <- p (1 - lr·wd)                                      (decoupled, torch.optim.AdamW's lr·wd)
    p   <- p - lr · (m / (1 - β1^t)) / (sqrt(v_b / (1 - β2^t)) + ε)

Partition (hyperparameter ``block``): ``"row"`` (default) gives a tensor with ``ndim >= 2`` one
block per output row (slice along dim 0: per output neuron of a Linear weight, per output
channel of a conv weight); ``"tensor"`` makes every tensor one block. Tensors with
``ndim <= 1`` (biases, norms) are always one block. The paper additionally splits Q/K
weights by head and treats embeddings per token; with ``block="row"`` a Q/K weight is split
per output neuron, a finer partition than per head. State: ``exp_avg`` (full size) and
``vmean`` (``(rows,)`` or ``()``), about half of AdamW's optimizer memory.
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.accumulators import FirstMoment
from distopt.accumulators.blockwise_moment import BlockwiseSecondMoment
from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, LR, WEIGHT_DECAY, betas, one_of
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.blockwise_root import BlockwiseRootPreconditioner


@register
class AdamMini(DistOptimizer):
    name = "adam_mini"
    family = "memory_efficient"
    reference = "naive per-tensor loop of Adam-mini (Zhang et al. 2024, Alg. 1)"
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": Hyper(1e-2, WEIGHT_DECAY.rule),
        "block": Hyper("row", one_of("row", "tensor")),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            BlockwiseSecondMoment(b2, group["block"]),
            FirstMoment(b1),
            BlockwiseRootPreconditioner(group["eps"], b1, b2),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(group["lr"]),
        )
