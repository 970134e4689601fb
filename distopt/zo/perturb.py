"""Counter-based perturbation directions: ``z[i] = f(seed, step, k, global_offset + i)``.

A ZO step is fully described by ``(seed, step, scalars)``: the direction ``z`` is never stored,
it is regenerated wherever it is needed (perturbation, update, replay, another rank) from a
64-bit key and the *global* element index of each entry. The model is seen as one flat vector
(the trainable parameters in optimizer order, each laid out row-major with its *global* shape),
so a shard of a parameter (FSDP2 ``Shard(0)``, a ZeRO partition) regenerates exactly its slice,
and any chunking of the work gives the same numbers.

Generator: SplitMix64 (Steele, Lea & Flood, OOPSLA 2014) used as a counter-based hash,
``bits = mix64(key + index * 0x9E3779B97F4A7C15)``, computed with wrapping int64 tensor
arithmetic (logical shifts are arithmetic shifts followed by a mask).

- ``rademacher``: ``z = ±1`` from the top bit.
- ``gaussian``: Box–Muller on two 24-bit uniforms from the hash. ``log`` and ``cos`` are
  evaluated with short polynomials in float32 using only ``+ - * /`` and ``sqrt`` (one torch
  kernel per operation, no fused multiply-add), because those are correctly rounded in IEEE
  arithmetic: the result for an element does not depend on where it falls in a vectorised loop
  (torch's SIMD ``log``/``cos`` and its scalar tail loop can differ in the last bit), so every
  chunking, sharding and replay of the same counters gives bit-identical ``z``. The values
  agree with float64 libm Box–Muller to ~1e-6 absolute; |z| <= 5.8.

``z`` is returned in float32 (float64 for float64 parameters is the same values, upcast).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


GAMMA = 0x9E3779B97F4A7C15
_C1, _C2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_GAMMA_S, _C1_S, _C2_S = _signed(GAMMA), _signed(_C1), _signed(_C2)


def mix64(x: int) -> int:
    """SplitMix64's finaliser on a Python int (unsigned 64-bit arithmetic)."""
    x &= MASK64
    x ^= x >> 30
    x = (x * _C1) & MASK64
    x ^= x >> 27
    x = (x * _C2) & MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """A 64-bit stream key from integers (seed, step, perturbation index, stream tag, ...)."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        h = mix64(h + GAMMA + (int(p) & MASK64))
    return h


def _mix64_(x: Tensor, y: Tensor) -> Tensor:
    """SplitMix64 finaliser on an int64 tensor ``x``, in place; ``y`` is scratch of x's shape."""
    for shift, mult in ((30, _C1_S), (27, _C2_S), (31, None)):
        torch.bitwise_right_shift(x, shift, out=y)
        y.bitwise_and_((1 << (64 - shift)) - 1)
        x.bitwise_xor_(y)
        if mult is not None:
            x.mul_(mult)
    return x


def hash_counters(key: int, counters: Tensor, scratch: Tensor | None = None) -> Tensor:
    """64 random bits per counter (int64 tensor, overwritten in place)."""
    counters.mul_(_GAMMA_S)
    counters.add_(_signed(key))
    return _mix64_(counters, torch.empty_like(counters) if scratch is None else scratch)


_LN2 = math.log(2.0)
_SQRT2 = math.sqrt(2.0)
_COS = [(-1) ** j / math.factorial(2 * j) for j in range(8)]


class _Workspace:
    """Scratch buffers, reused across calls (on CPU a fresh buffer of a few hundred KiB per chunk
    is a new mmap and costs more than the arithmetic). Two int64 buffers (``s0``, ``s1``) whose
    storage is reused as float32 pairs once the 64-bit values are no longer needed, two int32
    buffers and a mask: 25 bytes per element. ``sized(n)`` views the first n entries."""

    def __init__(self, n: int, device: torch.device, full: "_Workspace | None" = None) -> None:
        if full is None:
            self.s0, self.s1 = (torch.empty(n, dtype=torch.int64, device=device) for _ in range(2))
            self.i32 = [torch.empty(n, dtype=torch.int32, device=device) for _ in range(2)]
            self.mask = torch.empty(n, dtype=torch.bool, device=device)
        else:
            self.s0, self.s1 = full.s0[:n], full.s1[:n]
            self.i32 = [t[:n] for t in full.i32]
            self.mask = full.mask[:n]

    @property
    def capacity(self) -> int:
        return self.mask.numel()

    def floats(self, s: Tensor) -> tuple[Tensor, Tensor]:
        """The storage of an int64 buffer as two float32 buffers of the same length."""
        f = s.view(torch.float32)
        n = s.numel()
        return f[:n], f[n:]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.s0, self.s1, *self.i32, self.mask])


#: bytes of scratch per generated element (2 int64, 2 int32, 1 bool)
WORKSPACE_BYTES_PER_ELEMENT = 2 * 8 + 2 * 4 + 1
_WORKSPACES: dict[str, _Workspace] = {}


def _workspace(n: int, device: torch.device) -> _Workspace:
    ws = _WORKSPACES.get(str(device))
    if ws is None or ws.capacity < n:
        _WORKSPACES.pop(str(device), None)
        ws = _WORKSPACES[str(device)] = _Workspace(n, device)
    return _Workspace(n, device, full=ws)


def clear_workspace() -> None:
    """Free the cached scratch buffers (they are re-created on the next generation)."""
    _WORKSPACES.clear()


def workspace_bytes() -> int:
    """Bytes held by the cached scratch buffers."""
    return sum(ws.nbytes() for ws in _WORKSPACES.values())


def _log_int_(mant: Tensor, s: Tensor, acc: Tensor, e: Tensor, e2: Tensor, mask: Tensor) -> Tensor:
    """ln(v) for float32 ``v`` (given in ``mant``) holding integers in [1, 2^24], + - * / only.

    v = m 2^e with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.1716,
    series to s^11 (truncation < 3e-11). Returns ``acc``; clobbers the other buffers."""
    bits = mant.view(torch.int32)
    torch.bitwise_right_shift(bits, 23, out=e)
    bits.bitwise_and_((1 << 23) - 1).bitwise_or_(127 << 23)              # mant is now m in [1, 2)
    torch.gt(mant, _SQRT2, out=mask)
    e.add_(e2.copy_(mask)).sub_(127)
    mant.mul_(acc.copy_(mask).mul_(-0.5).add_(1.0))                        # m/2 where m > sqrt(2)
    torch.sub(mant, 1.0, out=s)
    s.div_(mant.add_(1.0))                                                 # s = (m-1)/(m+1)
    s2 = torch.mul(s, s, out=mant)
    acc.fill_(1.0 / 11.0)
    for k in range(9, 0, -2):
        acc.mul_(s2).add_(1.0 / k)
    acc.mul_(s).mul_(2.0)
    return acc.add_(mant.copy_(e).mul_(_LN2))


def _gaussian(bits: Tensor, ws: _Workspace, out: Tensor) -> Tensor:
    """Box–Muller with exact ops: u1 = (a + 1) / 2^24, u2 = b / 2^24 from two disjoint 24-bit
    fields; z = sqrt(-2 ln u1) cos(2 pi u2), cos per quadrant as ±cos(phi), phi in [0, pi/2].
    ``bits`` is ``ws.s0``; the cosine is formed first (in s0's storage), then the radius."""
    a, b, quadrant = ws.s1, ws.i32[0], ws.i32[1]
    torch.bitwise_right_shift(bits, 16, out=a)
    b.copy_(a.bitwise_and_((1 << 24) - 1))                                # b: 24 bits of u2
    torch.bitwise_right_shift(bits, 40, out=a)
    a.bitwise_and_((1 << 24) - 1).add_(1)                                 # a + 1: 24 bits of u1
    f0, f1 = ws.floats(ws.s0)                                             # bits are no longer needed
    torch.bitwise_right_shift(b, 22, out=quadrant)
    frac = f0.copy_(b.bitwise_and_((1 << 22) - 1)).mul_(2.0**-22)
    odd = f1.copy_(b.copy_(quadrant).bitwise_and_(1))
    flip = odd.mul_(-2.0).add_(1.0)                                       # 1 - 2 odd
    frac.mul_(flip).add_(flip.sub_(1.0).mul_(-0.5))                       # 1 - frac in odd quadrants
    x2 = frac.mul_(math.pi / 2)
    x2.mul_(x2)
    cos = f1.fill_(_COS[7])
    for c in reversed(_COS[:7]):
        cos.mul_(x2).add_(c)
    sign = f0.copy_(quadrant.add_(1).bitwise_right_shift_(1).bitwise_and_(1)).mul_(-2.0).add_(1.0)
    cos.mul_(sign)
    mant = f0.copy_(a)                                                    # a is no longer needed
    s, acc = ws.floats(ws.s1)
    radius = _log_int_(mant, s, acc, ws.i32[0], ws.i32[1], ws.mask)
    radius.sub_(24 * _LN2).mul_(-2.0).clamp_(min=0.0).sqrt_()
    return torch.mul(radius, cos, out=out)


def _rademacher(bits: Tensor, ws: _Workspace, out: Tensor) -> Tensor:
    tmp = ws.s1
    torch.bitwise_right_shift(bits, 63, out=tmp)
    tmp.bitwise_and_(1).mul_(-2).add_(1)
    return out.copy_(tmp)


DISTRIBUTIONS = ("gaussian", "rademacher")


def generate(key: int, base: int, cols: int, rows: slice | Tensor, distribution: str,
             device: torch.device | str = "cpu", out: Tensor | None = None) -> Tensor:
    """``z`` rows (float32, ``len(rows) x cols``) of a tensor whose element (0, 0) has global
    index ``base``; ``rows`` are global row indices (a slice or an index tensor). ``out`` (float32,
    contiguous, that many elements) receives the values when given."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    device = torch.device(device)
    count = (rows.stop - rows.start if isinstance(rows, slice) else rows.numel())
    n = count * cols
    if out is None:
        out = torch.empty(count, cols, dtype=torch.float32, device=device)
    if n == 0:
        return out.view(count, cols)
    ws = _workspace(n, device)
    counters = ws.s0
    if isinstance(rows, slice):
        start = base + rows.start * cols
        torch.arange(start, start + n, dtype=torch.int64, device=device, out=counters)
    else:
        grid = counters.view(count, cols)
        grid.copy_(torch.arange(cols, dtype=torch.int64, device=device).expand(count, cols))
        grid.add_(rows.to(device=device, dtype=torch.int64).view(-1, 1) * cols + base)
    bits = hash_counters(key, counters, scratch=ws.s1)
    flat = out.view(-1)
    if distribution == "gaussian":
        _gaussian(bits, ws, flat)
    else:
        _rademacher(bits, ws, flat)
    return out.view(count, cols)


__all__ = ["DISTRIBUTIONS", "clear_workspace", "derive_key", "generate", "hash_counters", "mix64", "workspace_bytes"]
