"""Where each trainable parameter sits in the model's flat vector, and which part this rank holds.

The model is one flat vector: the trainable parameters in optimizer order (``requires_grad``
only), each laid out row-major with its *global* shape. A :class:`Slot` records a parameter's
base offset in that vector and views it as ``rows x cols`` (``rows = shape[0]``, ``cols`` = the
rest; a 0-d tensor is 1 x 1), the granularity at which directions are generated: a block of
rows is a contiguous range of global indices.

Sharded parameters: a DTensor placed ``Shard(0)`` (FSDP2's layout) or ``Replicate`` holds a
block of whole rows locally; ``row_offset`` is the global index of its first local row, from the
DTensor's own placement arithmetic, so the shard regenerates exactly its slice of ``z``. Other
placements (``Shard(d)`` with d > 0, ``Partial``) are refused with a clear error. A DeepSpeed
ZeRO-3 parameter (``p.ds_tensor``: rank r of the partition group holds flat elements
``[r·part, (r+1)·part)`` of the parameter, the last partition padded) is laid out flat
(``rows = ds_numel``, ``cols = 1``): the generator is keyed by the global flat index only, so
the flat and the row-major layouts give the same ``z`` for the same element.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "_local_tensor")


def is_zero3(t: Tensor) -> bool:
    return hasattr(t, "ds_tensor") and hasattr(t, "ds_numel")


def _zero3_local(p: Tensor) -> tuple[Tensor, int]:
    """The valid part of this rank's flat ZeRO-3 partition, and its global flat offset."""
    import torch.distributed as dist

    if getattr(p, "ds_persist", False):
        raise NotImplementedError(
            "distopt.zo: a ZeRO-3 parameter is persisted (kept gathered, below "
            "stage3_param_persistence_threshold); its partition would not reach the forward pass. "
            "Set \"stage3_param_persistence_threshold\": 0 in the DeepSpeed config")
    part = p.ds_tensor.numel()
    offset = dist.get_rank(group=getattr(p, "ds_process_group", None)) * part
    valid = max(0, min(part, p.ds_numel - offset))
    return p.ds_tensor.view(-1)[:valid], offset


def _local_and_offset(p: Tensor) -> tuple[Tensor, int]:
    """The tensor this rank reads and writes, and the global row index of its first row."""
    if is_zero3(p):
        return _zero3_local(p)
    if not is_dtensor(p):
        return p, 0
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in p.placements:
        if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
            raise NotImplementedError(
                f"distopt.zo: DTensor placement {placement} is not supported; zeroth-order recipes "
                "handle Shard(0) (FSDP2) and Replicate, where a rank holds whole rows")
    local = p._local_tensor
    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return local, int(offset[0]) if p.dim() > 0 else 0


@dataclass
class Slot:
    """One trainable parameter: its place in the flat model vector and this rank's rows."""

    param: Tensor
    local: Tensor
    group: int
    index: int
    base: int
    rows: int          # global rows
    cols: int
    local_rows: int
    row_offset: int
    global_shape: tuple[int, ...]

    @property
    def matrix(self) -> Tensor:
        """The local tensor as ``local_rows x cols`` (a view)."""
        return self.local.view(self.local_rows, self.cols)

    def as_rows(self, t: Tensor) -> Tensor:
        """A tensor of the local shape (state buffer, backup) as ``local_rows x cols``."""
        return t.view(self.local_rows, self.cols)

    def blocks(self, chunk: int) -> list[slice]:
        """Local row blocks of at most ``max(chunk, cols)`` elements."""
        step = max(1, chunk // max(self.cols, 1))
        return [slice(r, min(r + step, self.local_rows)) for r in range(0, self.local_rows, step)]

    def global_rows(self, rows: slice | Tensor) -> slice | Tensor:
        if isinstance(rows, slice):
            return slice(rows.start + self.row_offset, rows.stop + self.row_offset)
        return rows + self.row_offset if self.row_offset else rows

    @property
    def sharded(self) -> bool:
        return is_dtensor(self.param) or is_zero3(self.param)


def build_slots(param_groups: Iterable[dict[str, Any]]) -> list[Slot]:
    """Slots for every ``requires_grad`` parameter, in optimizer order."""
    slots: list[Slot] = []
    base = 0
    for gi, group in enumerate(param_groups):
        for p in group["params"]:
            if not p.requires_grad:
                continue
            local, offset = _local_and_offset(p)
            if not local.is_contiguous():
                raise ValueError("distopt.zo: parameters must be contiguous (regenerating z by rows needs "
                                 "row-major storage); call .contiguous() on the module's parameters first")
            if is_zero3(p):
                shape = tuple(p.ds_shape)
                numel = int(p.ds_numel)
                rows, cols, local_rows = numel, 1, local.numel()
            else:
                shape = tuple(p.shape)
                numel = p.numel()
                rows = shape[0] if shape else 1
                cols = math.prod(shape[1:]) if len(shape) > 1 else 1
                local_rows = local.shape[0] if local.dim() else 1
            slots.append(Slot(p, local, gi, len(slots), base, rows, cols, local_rows, offset, shape))
            base += numel
    return slots


def rows_of(t: Tensor, rows: slice | Tensor) -> Tensor:
    """Rows of a 2-D tensor: a view for a slice, a gather for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def state_rows(slot: Slot, state: dict[str, Any], rows: slice | Tensor) -> dict[str, Any]:
    """The state buffers that have the parameter's local shape, restricted to ``rows``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == slot.local.shape and value.dim() > 0:
            out[key] = rows_of(slot.as_rows(value), rows)
        else:
            out[key] = value
    return out


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Directions and estimates are formed in float64 for float64 parameters, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


__all__ = ["Slot", "build_slots", "compute_dtype", "is_dtensor", "is_zero3", "rows_of", "state_rows"]
