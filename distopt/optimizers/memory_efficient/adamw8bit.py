"""AdamW with 8-bit block-wise quantized moments (Dettmers, Lewis, Shleifer & Zettlemoyer,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022), in plain torch (no bitsandbytes).

    m, v <- dequantize(state)                                  (dynamic tree map, one absmax per block)
    m <- β1 m + (1-β1) g;   v <- β2 v + (1-β2) g²
    p <- p (1 - lr·wd)                                         (decoupled, torch.optim.AdamW's lr·wd)
    p <- p - lr · (m / (1-β1^t)) / (sqrt(v / (1-β2^t)) + ε)    (fresh m, v, as bitsandbytes)
    state <- quantize(m), quantize(v)                          (signed map for m, unsigned for v)

Quantization: *dynamic* (tree) quantization, not linear: per block of ``block_size`` (256)
consecutive elements of the tensor's flat view, uint8 codes into the 256-value dynamic map
(the paper's and bitsandbytes' map, bit-identical) and one float32 absmax; rounding to the
nearest map value (ties to the smaller one). No stable embedding layer, no percentile
clipping (bitsandbytes' extras). Tensors with fewer than ``min_8bit_size`` (4096) elements
keep unquantized float32 moments (float64 for float64 params), as bitsandbytes does: the
2.03 bytes/param of the 8-bit state hold for the large matrices, small tensors cost 8.

State per quantized tensor: ``exp_avg_codes``, ``exp_avg_sq_codes`` (uint8, param's shape),
``exp_avg_absmax``, ``exp_avg_sq_absmax`` (float32, ``ceil(numel / block_size)``); small
tensors: ``exp_avg``, ``exp_avg_sq``. The code maps are module constants, not state.
``load_state_dict`` keeps those dtypes (torch would cast every state tensor to the param's
dtype, rounding float32 scales of bfloat16 params).
"""
from __future__ import annotations

from typing import Any, Mapping

from distopt.core import Chain, DistOptimizer, Hyper, chain, register
from distopt.core.hyper import EPS, LR, WEIGHT_DECAY, betas, integer
from distopt.preconditioners import ApplyLR, DecoupledWeightDecay
from distopt.preconditioners.quantized_adam import BlockwiseQuantizedAdam


@register
class AdamW8bit(DistOptimizer):
    __doc__ = __doc__
    name = "adamw8bit"
    family = "memory_efficient"
    keep_state_dtypes = True
    reference = ("naive per-tensor loop of block-wise 8-bit AdamW (quantize/dequantize every step, exact); "
                 "torch.optim.AdamW (bounded quantization error); bitsandbytes AdamW8bit on CPU (loose)")
    hyper = {
        "lr": LR,
        "betas": Hyper((0.9, 0.999), betas(2)),
        "eps": EPS,
        "weight_decay": Hyper(1e-2, WEIGHT_DECAY.rule),
        "block_size": Hyper(256, integer(1)),
        "min_8bit_size": Hyper(4096, integer(0)),
    }

    @classmethod
    def recipe(cls, group: Mapping[str, Any]) -> Chain:
        b1, b2 = group["betas"]
        return chain(
            BlockwiseQuantizedAdam(b1, b2, group["eps"], group["block_size"], group["min_8bit_size"]),
            DecoupledWeightDecay(group["weight_decay"], group["lr"]),
            ApplyLR(group["lr"]),
        )
