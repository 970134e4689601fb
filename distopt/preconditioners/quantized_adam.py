"""P operator: the Adam direction with both moments stored block-wise 8-bit quantized
(Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022, Sec. 2).

For a tensor with at least ``min_8bit_size`` elements, at step t (arithmetic in float32, or
float64 for float64 params; D/Q = block-wise dequantize/quantize, see scenarios/quantization.py):

    m = D(m_codes, m_absmax);   v = D(v_codes, v_absmax)             (signed / unsigned dynamic maps)
    m <- β1 m + (1 - β1) g;     v <- β2 v + (1 - β2) g²
    u = (m / (1 - β1^t)) / (sqrt(v) / sqrt(1 - β2^t) + ε)            (from the fresh, unquantized m, v)
    (m_codes, m_absmax) = Q(m);  (v_codes, v_absmax) = Q(v)          (stored for the next step)

as bitsandbytes' blockwise 8-bit Adam kernels do: the update uses this step's full-precision
moments, the quantization error enters through the stored state only. Smaller tensors keep
unquantized ``exp_avg`` / ``exp_avg_sq`` in float32 (float64 for float64 params), like
bitsandbytes' ``min_8bit_size``. State per quantized tensor: two uint8 code tensors of the
param's shape and two float32 ``(ceil(numel / block_size),)`` scales: 2 + 8 / block_size bytes
per element.

Locality: TENSOR. The math is elementwise but the scales are reductions over blocks of the
tensor's flat (row-major) view, so a slice is exact only if it starts at a multiple of
``block_size``; the ownership plan keeps the tensor whole. Runs one tensor at a time (the
foreach and per-tensor routes are the same code).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distopt.core.operator import Locality, Operator, Stage, StepContext
from distopt.scenarios.quantization import compute_dtype, dequantize_blockwise, num_blocks, quantize_blockwise

MOMENTS = (("exp_avg", True), ("exp_avg_sq", False))  # (state key, signed map)


class BlockwiseQuantizedAdam(Operator):
    """Adam direction ``m̂ / (sqrt(v̂) + ε)`` (a new tensor in the update's dtype) with 8-bit
    block-quantized moments for tensors of at least ``min_8bit_size`` elements."""

    stage = Stage.P
    locality = Locality.TENSOR

    def __init__(
        self, beta1: float, beta2: float, eps: float, block_size: int = 256, min_8bit_size: int = 4096
    ) -> None:
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.block_size, self.min_8bit_size = block_size, min_8bit_size

    def quantized(self, param: Tensor) -> bool:
        return param.numel() >= self.min_8bit_size

    def init(self, param: Tensor) -> dict[str, Tensor]:
        if not self.quantized(param):
            dtype = compute_dtype(param.dtype)
            return {key: torch.zeros(param.shape, dtype=dtype, device=param.device) for key, _ in MOMENTS}
        blocks = num_blocks(param.numel(), self.block_size)
        state = {}
        for key, _ in MOMENTS:
            state[key + "_codes"] = torch.zeros(param.shape, dtype=torch.uint8, device=param.device)
            state[key + "_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
        return state

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        out = []
        for g, state, t in zip(updates, ctx.states, ctx.steps):
            quantized = "exp_avg" not in state
            if quantized:
                m, v = (dequantize_blockwise(state[k + "_codes"], state[k + "_absmax"], self.block_size, s, g.dtype)
                        for k, s in MOMENTS)
            else:
                m, v = state["exp_avg"], state["exp_avg_sq"]
            gc = g.to(m.dtype)
            m.lerp_(gc, 1.0 - self.beta1)
            v.mul_(self.beta2).addcmul_(gc, gc, value=1.0 - self.beta2)
            denom = (v.sqrt() / math.sqrt(1.0 - self.beta2**t)).add_(self.eps)
            out.append(m.div(denom).div_(1.0 - self.beta1**t).to(g.dtype))
            if quantized:
                for (key, signed), x in zip(MOMENTS, (m, v)):
                    quantize_blockwise(x, self.block_size, signed, state[key + "_codes"], state[key + "_absmax"])
        return out
