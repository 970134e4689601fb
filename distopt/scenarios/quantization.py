"""Block-wise 8-bit quantization of optimizer state (Dettmers, Lewis, Shleifer & Zettlemoyer,
"8-bit Optimizers via Block-wise Quantization", ICLR 2022), in plain torch.

A tensor is flattened (row-major) and cut into blocks of ``block_size`` consecutive elements
(the last block may be shorter). Each block keeps one float32 scale, its absolute maximum
``a_b = max_{i ∈ b} |x_i|``, and one uint8 code per element:

    code_i = argmin_k |x_i / a_b - Q[k]|    (a_b as stored; nearest entry, ties to the smaller one)
    x̂_i    = Q[code_i] · a_b

``Q`` is the paper's *dynamic (tree) quantization* map, 256 sorted float32 values: a value
is a sign bit (signed map only), a run of e zeros giving the decimal exponent 10^-e
(e = 0..6), an indicator bit, and the remaining F bits a linear fraction in [0.1, 1]
(bin midpoints): F = 6 - e for the signed map, 7 - e for the unsigned one, plus 0 and 1.
Signed (first moment): values in [-0.993, 1]; unsigned (second moment): [0, 1], smallest
positive 3.25e-7. These are the same 256 values as bitsandbytes' ``create_dynamic_map``.
The map is a shared constant (one copy per device), never stored per parameter.

The arithmetic (normalization, look-up) runs in ``compute_dtype(x)``: float32, or float64
for float64 tensors; scales are always stored as float32. A block of zeros has scale 0
and dequantizes to zeros whatever its codes.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_MAPS: dict[tuple[bool, torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}


def dynamic_map(signed: bool) -> Tensor:
    """The 256 sorted values of the dynamic tree quantization map, float32 on CPU (bin
    midpoints computed in float32, as bitsandbytes does, so the two maps are bit-identical)."""
    values = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        bins = 2 ** ((6 if signed else 7) - e)
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float32)
        mids = 10.0**-e * ((edges[:-1] + edges[1:]) / 2)
        values += [mids, -mids] if signed else [mids]
    q = torch.cat(values).sort().values
    assert q.numel() == 256
    return q


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16/32-bit floats, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _map(signed: bool, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(values, midpoints between consecutive values) of the map, cached per device/dtype."""
    key = (signed, device, dtype)
    if key not in _MAPS:
        q = dynamic_map(signed).to(device=device, dtype=dtype)
        _MAPS[key] = (q, (q[1:] + q[:-1]) / 2)
    return _MAPS[key]


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def _blocks(flat: Tensor, block_size: int) -> Tensor:
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block_size)


def quantize_blockwise(x: Tensor, block_size: int, signed: bool, codes: Tensor, absmax: Tensor) -> None:
    """Write the codes of ``x`` into ``codes`` (uint8, ``x``'s numel) and its block scales into
    ``absmax`` (float32, one per block)."""
    dtype = compute_dtype(x.dtype)
    blocks = _blocks(x.detach().reshape(-1).to(dtype), block_size)
    absmax.copy_(blocks.abs().amax(dim=1))
    scale = absmax.to(dtype).clamp_min(torch.finfo(dtype).tiny).unsqueeze(1)
    _, mids = _map(signed, x.device, dtype)
    idx = torch.bucketize(blocks / scale, mids).view(-1)[: x.numel()]
    codes.copy_(idx.view(codes.shape))


def dequantize_blockwise(codes: Tensor, absmax: Tensor, block_size: int, signed: bool, dtype: torch.dtype) -> Tensor:
    """A new tensor of ``codes``' shape in ``compute_dtype(dtype)``: ``Q[code] · scale``."""
    dtype = compute_dtype(dtype)
    q, _ = _map(signed, codes.device, dtype)
    values = q.index_select(0, codes.reshape(-1).to(torch.int32))
    blocks = _blocks(values, block_size) * absmax.to(dtype).unsqueeze(1)
    return blocks.view(-1)[: codes.numel()].view(codes.shape)
