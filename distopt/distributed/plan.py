"""Ownership plan: which rank keeps which optimizer state (DESIGN.md §4). Pure: no processes,
no tensors, only shapes, localities and a cost model, so it is unit tested without a process
group and shared by every backend (DDP ZeRO here; FSDP2 and DeepSpeed reuse it).

Input: one :class:`ParamSpec` per parameter (name, *global* shape, locality, modelled per-step
cost and state bytes, and for ``TENSOR``/``MATRIX`` params the ownership units, see
:class:`BlockSpec`), and the world size ``N``. Output (:class:`OwnershipPlan`): a list of
:class:`Piece` s, each owned by one rank:

- ``ELEMENTWISE`` params: the state is split in flat slices, ZeRO style, over the flattened
  concatenation of all elementwise params in parameter order. Each rank owns one contiguous
  range of it (so a rank holds few, large views; a parameter straddling a boundary is split in
  two). Cuts inside a parameter fall on multiples of ``align`` elements from its start, so a
  slice runs the same vectorised kernel chunks as the whole tensor (bitwise-equal updates) and
  keeps the pointer alignment of the parameter. Slices may be uneven.
- ``TENSOR`` / ``MATRIX`` params: each block (by default the whole parameter; an optimizer can
  declare finer, independent blocks such as Shampoo's) is owned whole by one rank, assigned by
  greedy LPT on cost (largest first to the least-loaded rank, as Distributed Shampoo's DDP
  distributor) under a state cap ``total_state/N + largest_block_state`` that every choice can
  meet, so per-rank state never exceeds ``total/N + one largest block``.
- Then the elementwise ranges are *water-filled*: ranks that got little block state get more
  elementwise state (levels solved exactly), so per-rank state is as flat as the blocks allow.

Per-rank compute load and state bytes are reported (:meth:`OwnershipPlan.summary`), together
with the lower bound ``max(1, largest unit cost / mean load)`` that no whole-block assignment
can beat: with fewer (or very unequal) matrices than ranks, perfect balance is impossible.
``largest_block_state`` counts an ``align``-element chunk of elementwise state as a block too
(the granularity of a slice), so ``max state <= total/N + largest block`` holds exactly.

Cost models are plain functions (``elementwise_cost``, ``newton_schulz_cost``,
``shampoo_block_cost``); they only need to be right relative to each other.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from distopt.core.operator import Locality

Box = tuple[tuple[int, int], ...]


# ----------------------------------------------------------------------------- cost models

def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape))


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) matrix a matrix recipe sees: (shape[0], prod(shape[1:])); vectors (1, n)."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, int(shape[0])
    return int(shape[0]), numel(shape[1:])


def elementwise_cost(shape: Sequence[int]) -> float:
    """Elementwise and tensor recipes: a few flops per element, memory bound: ``numel``."""
    return float(numel(shape))


def newton_schulz_cost(shape: Sequence[int], steps: int = 5) -> float:
    """Muon: ``steps`` quintic Newton–Schulz iterations on the (m, n) view, k = min(m, n):
    X Xᵀ (m·n·k), the quintic (k³) and the product with X (m·n·k) multiply-adds per step,
    plus the elementwise momentum."""
    m, n = matrix_view(shape)
    k = min(m, n)
    return float(steps * (2 * m * n * k + k ** 3) + m * n)


def shampoo_blocks(shape: Sequence[int], block_size: int = 1024) -> list[Box]:
    """Distributed Shampoo's blocking: the (m, n) matrix view cut into tiles of at most
    ``block_size`` along each dimension (vectors: chunks of ``block_size``). Boxes are in the
    coordinates of the *original* shape for ndim <= 2; for ndim > 2 on the (m, n) view."""
    if len(shape) == 0:
        return [()]
    if len(shape) == 1:
        n = int(shape[0])
        return [((a, min(a + block_size, n)),) for a in range(0, n, block_size)]
    m, n = matrix_view(shape)
    return [((a, min(a + block_size, m)), (b, min(b + block_size, n)))
            for a in range(0, m, block_size) for b in range(0, n, block_size)]


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(b - a for a, b in box)


def shampoo_block_cost(shape: Sequence[int], precondition_frequency: int = 10, root_cost: float = 10.0) -> float:
    """One Shampoo block (a, b) per step: statistics G Gᵀ, Gᵀ G (a²b + ab²), preconditioning
    L G R (a²b + ab²), and the two inverse roots (≈ ``root_cost``·d³ each, eigh) amortised over
    ``precondition_frequency`` steps. Vectors (a,): one a×a factor."""
    if len(shape) <= 1:
        a = numel(shape)
        return float(2 * a * a + root_cost * a ** 3 / precondition_frequency)
    a, b = matrix_view(shape)
    return float(2 * (a * a * b + a * b * b) + root_cost * (a ** 3 + b ** 3) / precondition_frequency)


def shampoo_block_state(shape: Sequence[int], itemsize: int = 4) -> float:
    """State of one Shampoo block: factors L, R and their inverse roots (2a² + 2b²), momentum and
    grafting (2ab); vectors: 2a² + 2a."""
    if len(shape) <= 1:
        a = numel(shape)
        return float(itemsize * (2 * a * a + 2 * a))
    a, b = matrix_view(shape)
    return float(itemsize * (2 * a * a + 2 * b * b + 2 * a * b))


# ----------------------------------------------------------------------------- plan input/output

@dataclass(frozen=True)
class BlockSpec:
    """An ownership unit of a ``TENSOR``/``MATRIX`` param: the box ``((start, stop), ...)`` per
    dimension of the param (``None``: the whole param), its per-step cost and state bytes. A
    recipe run on the box alone must be exact (e.g. Shampoo's blocks; never a cut through a
    Newton–Schulz matrix)."""

    box: Box | None
    cost: float
    state_bytes: float


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the planner sees it: *global* shape (``DTensor.shape``, DeepSpeed's
    ``ds_shape``; never a local shard), locality, modelled per-step cost and optimizer-state
    bytes of the whole parameter, and (non-elementwise) its ownership blocks."""

    name: str
    shape: tuple[int, ...]
    locality: Locality = Locality.ELEMENTWISE
    cost: float | None = None
    state_bytes: float | None = None
    blocks: tuple[BlockSpec, ...] = ()
    itemsize: int = 4
    dtype: str = "float32"
    group: int = 0

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def total_cost(self) -> float:
        if self.locality is not Locality.ELEMENTWISE and self.blocks:
            return sum(b.cost for b in self.blocks)
        return elementwise_cost(self.shape) if self.cost is None else float(self.cost)

    @property
    def total_state(self) -> float:
        if self.locality is not Locality.ELEMENTWISE and self.blocks:
            return sum(b.state_bytes for b in self.blocks)
        return 2.0 * self.numel * self.itemsize if self.state_bytes is None else float(self.state_bytes)

    def units(self) -> tuple[BlockSpec, ...]:
        """Ownership units of a non-elementwise param (default: the whole param)."""
        return self.blocks or (BlockSpec(None, self.total_cost, self.total_state),)


@dataclass(frozen=True)
class Piece:
    """What one rank owns of one param: a flat slice ``[start, stop)`` of an elementwise param
    (``block == -1``), or block number ``block`` (``box``, None = whole) of a tensor/matrix param."""

    param: int
    rank: int
    start: int = 0
    stop: int = 0
    block: int = -1
    box: Box | None = None

    @property
    def is_slice(self) -> bool:
        return self.block < 0

    @property
    def numel(self) -> int:
        if self.is_slice:
            return self.stop - self.start
        return self.stop - self.start if self.box is None else numel(box_shape(self.box))


@dataclass(frozen=True)
class OwnershipPlan:
    world_size: int
    params: tuple[ParamSpec, ...]
    pieces: tuple[Piece, ...]
    align: int
    load: tuple[float, ...]
    state: tuple[float, ...]
    lower_bound: float
    largest_block_state: float
    _by_rank: dict[int, tuple[Piece, ...]] = field(default_factory=dict, repr=False, compare=False)

    def for_rank(self, rank: int) -> tuple[Piece, ...]:
        """The pieces ``rank`` owns, in parameter order."""
        if rank not in self._by_rank:
            self._by_rank[rank] = tuple(p for p in self.pieces if p.rank == rank)
        return self._by_rank[rank]

    def pieces_of(self, param: int) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if p.param == param)

    def numel(self, rank: int) -> int:
        return sum(p.numel for p in self.for_rank(rank))

    @property
    def total_state(self) -> float:
        return float(sum(self.state))

    def summary(self) -> dict[str, float]:
        """Balance figures: max/mean compute load (and its lower bound for whole blocks), max
        per-rank state against the bound ``total/N + largest block``."""
        n = self.world_size
        mean_load = sum(self.load) / n
        total = self.total_state
        return {
            "world_size": n,
            "max_over_mean_load": (max(self.load) / mean_load) if mean_load > 0 else 1.0,
            "lower_bound_load": self.lower_bound,
            "max_state": max(self.state),
            "total_state": total,
            "mean_state": total / n,
            "state_bound": total / n + self.largest_block_state,
            "largest_block_state": self.largest_block_state,
            "max_over_mean_state": (max(self.state) * n / total) if total > 0 else 1.0,
        }

    def fingerprint(self) -> dict[str, Any]:
        """World-size independent layout: names, shapes, dtypes, localities and block boxes.
        Two plans with equal fingerprints shard the same state (resharding allowed)."""
        return {"params": [
            {"name": s.name, "shape": list(s.shape), "dtype": s.dtype, "locality": s.locality.name.lower(),
             "blocks": None if s.locality is Locality.ELEMENTWISE or not s.blocks
             else [None if b.box is None else [list(x) for x in b.box] for b in s.blocks]}
            for s in self.params]}

    def layout_hash(self) -> str:
        """Hash of the fingerprint *and* of this world size's assignment (for per-rank shards)."""
        body = {"fp": self.fingerprint(), "n": self.world_size, "align": self.align,
                "pieces": [[p.param, p.rank, p.start, p.stop, p.block] for p in self.pieces]}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- the planner

def _assign_blocks(params: Sequence[ParamSpec], n: int, total_state: float
                   ) -> tuple[list[tuple[int, int, BlockSpec, int]], list[float], list[float], float]:
    units = [(i, b, u) for i, s in enumerate(params) if s.locality is not Locality.ELEMENTWISE
             for b, u in enumerate(s.units())]
    largest = max((u.state_bytes for _, _, u in units), default=0.0)
    cap = total_state / n + largest
    load, state = [0.0] * n, [0.0] * n
    out = []
    for i, b, u in sorted(units, key=lambda t: (-t[2].cost, -t[2].state_bytes, t[0], t[1])):
        fits = [r for r in range(n) if state[r] + u.state_bytes <= cap * (1 + 1e-12)] or list(range(n))
        r = min(fits, key=lambda k: (load[k], state[k], k))
        load[r] += u.cost
        state[r] += u.state_bytes
        out.append((i, b, u, r))
    out.sort(key=lambda t: (t[0], t[1]))
    return out, load, state, largest


def _water_level(base: list[float], amount: float) -> list[float]:
    """Shares x_r = max(0, L - base_r) with sum x_r = amount (exact piecewise-linear solve)."""
    n = len(base)
    if amount <= 0:
        return [0.0] * n
    order = sorted(base)
    prefix = 0.0
    level = order[-1] + amount / n
    for k in range(1, n + 1):
        prefix += order[k - 1]
        candidate = (amount + prefix) / k
        if k == n or candidate <= order[k]:
            level = candidate
            break
    return [max(0.0, level - b) for b in base]


def _cut(offset: float, n: int, align: int) -> int:
    """Round a cut inside a param of ``n`` elements to a multiple of ``align`` (or its end)."""
    c = int(round(offset / align)) * align
    return max(0, min(n, c))


def plan_ownership(params: Sequence[ParamSpec], world_size: int, align: int = 64) -> OwnershipPlan:
    """Decide which rank owns which state (see the module docstring)."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"plan_ownership: world_size must be an integer >= 1, got {world_size!r}")
    if align < 1:
        raise ValueError(f"plan_ownership: align must be >= 1, got {align!r}")
    params = tuple(params)
    n = world_size
    total_state = sum(s.total_state for s in params)
    blocks, block_load, block_state, largest = _assign_blocks(params, n, total_state)

    # elementwise: water-fill by state bytes (by cost if the recipe keeps no state, by numel if neither)
    elem = [i for i, s in enumerate(params) if s.locality is Locality.ELEMENTWISE]
    e_state = sum(params[i].total_state for i in elem)
    e_cost = sum(params[i].total_cost for i in elem)
    if e_state > 0:
        weight = [params[i].total_state / max(params[i].numel, 1) for i in elem]
        base = block_state
    elif e_cost > 0:
        weight = [params[i].total_cost / max(params[i].numel, 1) for i in elem]
        base = block_load
    else:
        weight = [1.0 for _ in elem]
        base = [0.0] * n
    total_weight = sum(w * params[i].numel for w, i in zip(weight, elem))
    shares = _water_level(list(base), total_weight)
    # cumulative weight targets -> cut points (global element offsets in the concatenation)
    bounds, acc = [], 0.0
    for r in range(n - 1):
        acc += shares[r]
        bounds.append(acc)
    pieces: list[Piece] = []
    starts = [0.0]  # weight at the start of each elementwise param
    for w, i in zip(weight, elem):
        starts.append(starts[-1] + w * params[i].numel)
    elem_pieces: dict[int, list[Piece]] = {}
    for k, (w, i) in enumerate(zip(weight, elem)):
        size = params[i].numel
        lo_w, hi_w = starts[k], starts[k + 1]
        cuts = [0]
        owners = [sum(1 for b in bounds if b <= lo_w)]  # rank owning the first element
        for r, b in enumerate(bounds):
            if lo_w < b < hi_w:
                c = _cut((b - lo_w) / w, size, align) if w > 0 else size
                cuts.append(c)
                owners.append(r + 1)
        cuts.append(size)
        out = []
        for (a, z), r in zip(zip(cuts, cuts[1:]), owners):
            if z > a:
                out.append(Piece(i, r, a, z))
        if size == 0:
            out.append(Piece(i, owners[0], 0, 0))
        elem_pieces[i] = out
    for i, b, u, r in blocks:
        s = params[i]
        elem_pieces.setdefault(i, []).append(Piece(i, r, 0, s.numel if u.box is None else 0, b, u.box))
    for i in range(len(params)):
        pieces.extend(elem_pieces.get(i, []))

    load, state = list(block_load), list(block_state)
    for p in pieces:
        if p.is_slice and params[p.param].numel:
            s = params[p.param]
            frac = (p.stop - p.start) / s.numel
            load[p.rank] += frac * s.total_cost
            state[p.rank] += frac * s.total_state
    # an elementwise cut moves by at most half an align chunk: the chunk is the elementwise "block"
    chunk = max((align * w for w in weight), default=0.0) if e_state > 0 else 0.0
    largest = max(largest, chunk)
    total_cost = sum(load)
    max_unit = max((u.cost for _, _, u, _ in blocks), default=0.0)
    mean = total_cost / n
    lower = max(1.0, max_unit / mean) if mean > 0 else 1.0
    return OwnershipPlan(n, params, tuple(pieces), align, tuple(load), tuple(state), lower, largest)


def check_plan(plan: OwnershipPlan) -> None:
    """Invariants (used by the tests): every element of every elementwise param owned exactly
    once, every block owned exactly once."""
    for i, s in enumerate(plan.params):
        ps = plan.pieces_of(i)
        if s.locality is Locality.ELEMENTWISE:
            spans = sorted((p.start, p.stop) for p in ps)
            pos = 0
            for a, b in spans:
                if a != pos:
                    raise AssertionError(f"{s.name}: gap or overlap at {pos}")
                pos = b
            if pos != s.numel:
                raise AssertionError(f"{s.name}: covers {pos} of {s.numel}")
        else:
            ids = sorted(p.block for p in ps)
            if ids != list(range(len(s.units()))):
                raise AssertionError(f"{s.name}: blocks {ids}")


def specs_from_shapes(named_shapes: Iterable[tuple[str, Sequence[int]]], locality: Locality = Locality.ELEMENTWISE,
                      **kwargs: Any) -> list[ParamSpec]:
    """Plain specs (default cost ``numel``, state 2 buffers of fp32) for quick planning."""
    return [ParamSpec(name, tuple(int(x) for x in shape), locality, **kwargs) for name, shape in named_shapes]
