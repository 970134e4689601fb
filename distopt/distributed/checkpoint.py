"""Distributed checkpoints of sharded optimizer state with ``torch.distributed.checkpoint`` (DCP),
in a world-size independent layout, so a run saved on N ranks resumes on M ranks (or in one
plain process) with the identical continuation.

    from distopt.distributed import checkpoint
    checkpoint.save("ckpt/step_1000", opt, model=model)     # every rank (collective)
    checkpoint.load("ckpt/step_1000", opt, model=model)     # any world size, any rank count

``opt`` is a :class:`~distopt.distributed.zero.ZeroOptimizer` or a plain distopt optimizer (one
process: the whole state). Keys follow ``get_optimizer_state_dict``'s ``state.<fqn>.<buffer>``
naming, with the parameter name (``named_parameters`` given to the ZeroOptimizer, default
``"<group>.<index>"``) and, where the state is sharded, the piece:

- ``optim.state.<fqn>.<buffer>``: a buffer of a param owned whole (tensor/matrix recipes), or a
  0-d buffer of an elementwise param (saved once, by the owner of its first element);
- ``optim.state.<fqn>.<buffer>.<start>_<stop>``: elements ``[start, stop)`` of the flattened
  buffer of an elementwise param (each rank writes its slices; a loader reads the pieces that
  overlap its own slices and copies the overlap, so any N -> M resharding works);
- ``optim.state.<fqn>.block<k>.<buffer>``: a buffer of block ``k`` of a blocked param;
- ``optim._distopt.rank<r>``: a JSON manifest (stored as a uint8 tensor): the layout
  fingerprint (recipe name, params' names, global shapes, dtypes, localities, blocks), the saved
  world size, the param groups' hyperparameters and rank r's entries. Nothing is pickled:
  loading reads tensors with ``torch.load(weights_only=True)`` (DCP's reader) and the
  manifests with ``json``; DCP's own ``.metadata`` file is read by :class:`SafeFileSystemReader`,
  whose unpickler only admits DCP's metadata classes.
- ``model.<key>``: ``model.state_dict()`` when ``model`` is given (replicated under DDP: DCP
  writes it once).

Loading checks the fingerprint first: another recipe, other parameter names or shapes, or
another block grid raise ``ValueError`` naming the difference. Hyperparameters (e.g. an LR
scheduler's current ``lr``) are restored into ``param_groups``.
"""
from __future__ import annotations

import io
import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor

from distopt.core.shell import DistOptimizer
from distopt.distributed.plan import Piece, plan_ownership
from distopt.distributed.specs import optimizer_specs
from distopt.distributed.zero import ZeroOptimizer

PREFIX = "optim."
MANIFEST = PREFIX + "_distopt.rank"
VERSION = 1


def _dcp(fn: Any, state_dict: dict[str, Any], optimizer: Any, **kwargs: Any) -> None:
    """``dcp.save``/``dcp.load`` on the optimizer's process group, or in one process without one."""
    if dist.is_available() and dist.is_initialized():
        fn(state_dict, process_group=getattr(optimizer, "process_group", None), **kwargs)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state_dict, no_dist=True, **kwargs)


# ----------------------------------------------------------------------------- safe metadata reader

class _MetadataUnpickler(pickle.Unpickler):
    """Admits only the classes a DCP ``.metadata`` file is made of."""

    SAFE_MODULES = ("torch.distributed.checkpoint.",)
    SAFE = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
            ("builtins", "slice"), ("torch", "device"), ("torch.serialization", "_get_layout"),
            ("torch", "contiguous_format"), ("torch", "channels_last"), ("torch", "preserve_format"),
            ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
            ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(self.SAFE_MODULES) or (module, name) in self.SAFE:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed "
                                     "(only torch.distributed.checkpoint metadata classes are)")


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ----------------------------------------------------------------------------- layout of an optimizer

class _View:
    """What a rank holds: plan, its pieces with their tensors, and where the state lives."""

    def __init__(self, optimizer: Any, model: torch.nn.Module | None = None) -> None:
        if isinstance(optimizer, ZeroOptimizer):
            self.outer = optimizer.optimizer
            self.plan = optimizer.plan
            self.rank, self.world = optimizer.rank, optimizer.world_size
            self.local = list(optimizer.local)
            self.state = optimizer.inner.state
            self.sync = optimizer._sync_out
            self.params = optimizer._params
        elif isinstance(optimizer, DistOptimizer):
            self.outer = optimizer
            self.params = [p for g in optimizer.param_groups for p in g["params"]]
            self.plan = plan_ownership(optimizer_specs(optimizer), 1)
            self.rank, self.world = 0, 1
            self.local = [(pc, self.params[pc.param]) for pc in self.plan.for_rank(0)]
            for pc in self.plan.pieces:
                if pc.box is not None:
                    raise ValueError("checkpoint: a plain optimizer keeps one state per param; this recipe declares "
                                     "blocks (param_blocks): save and load it through a ZeroOptimizer")
            self.state = optimizer.state
            self.sync = lambda: None
        else:
            raise TypeError(f"checkpoint: expected a ZeroOptimizer or a distopt optimizer, got {type(optimizer).__name__}")
        model = getattr(model, "module", model)  # DDP / FSDP wrappers: the names of the inner module
        by_id = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self.names = [by_id.get(id(p), s.name) for p, s in zip(self.params, self.plan.params)]

    def fingerprint(self) -> dict[str, Any]:
        fp = self.plan.fingerprint()
        for entry, name in zip(fp["params"], self.names):
            entry["name"] = name
        return {"recipe": self.outer.name, **fp}


def _encode(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).replace("torch.", "")}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__dtype__" in value:
        return getattr(torch, value["__dtype__"])
    if isinstance(value, dict) and "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _hyper(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        enc = {}
        for k, v in g.items():
            if k == "params":
                continue
            try:
                enc[k] = _encode(v)
            except TypeError:
                pass  # not JSON-representable: kept as constructed
        out.append(enc)
    return out


def _to_uint8(obj: Any) -> Tensor:
    return torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).clone()


def _from_uint8(t: Tensor) -> Any:
    return json.loads(bytes(t.tolist()).decode())


# ----------------------------------------------------------------------------- state dict (this rank)

def get_optimizer_state_dict(optimizer: Any, model: torch.nn.Module | None = None) -> dict[str, Tensor]:
    """This rank's optimizer state in the global layout: a flat ``{key: tensor}`` for ``dcp.save``.
    ``model`` (optional) names the params by ``model.named_parameters()``."""
    view = _View(optimizer, model)
    view.sync()
    out: dict[str, Tensor] = {}
    entries = []
    for piece, t in view.local:
        st = view.state.get(t)
        if not st:
            continue
        p = view.params[piece.param]
        fqn = view.names[piece.param]
        for buf, v in st.items():
            e: dict[str, Any] = {"fqn": fqn, "buf": buf}
            if not isinstance(v, Tensor):
                e.update(kind="py", value=_encode(v))
                entries.append(e)
                continue
            e.update(dtype=str(v.dtype).replace("torch.", ""), cpu=v.device.type == "cpu" and p.device.type != "cpu")
            if piece.is_slice:
                n = piece.stop - piece.start
                if v.dim() == 0 and (p.dim() != 0 or buf == "step"):  # a 0-d param's buffers are param-shaped
                    if piece.start != 0:
                        continue
                    key, tensor, kind = f"{PREFIX}state.{fqn}.{buf}", v, "scalar"
                elif v.numel() == n and (v.shape == t.shape or v.shape == p.shape):
                    key, tensor, kind = f"{PREFIX}state.{fqn}.{buf}.{piece.start}_{piece.stop}", v.reshape(-1), "slice"
                    e.update(start=piece.start, stop=piece.stop)
                else:
                    raise ValueError(f"checkpoint: state {buf!r} of {fqn} has shape {tuple(v.shape)}, neither the "
                                     "param's nor a scalar; an elementwise recipe must keep param-shaped buffers")
            elif piece.box is None:
                key, tensor, kind = f"{PREFIX}state.{fqn}.{buf}", v, "whole"
            else:
                key, tensor, kind = f"{PREFIX}state.{fqn}.block{piece.block}.{buf}", v, "block"
                e.update(block=piece.block)
            e.update(key=key, kind=kind, shape=list(tensor.shape))
            out[key] = tensor.detach()
            entries.append(e)
    manifest = {"version": VERSION, "fingerprint": view.fingerprint(), "world_size": view.world, "rank": view.rank,
                "param_groups": _hyper(view.outer.param_groups), "entries": entries}
    out[f"{MANIFEST}{view.rank}"] = _to_uint8(manifest)
    return out


def save(path: str | Path, optimizer: Any, model: torch.nn.Module | None = None) -> None:
    """Save ``optimizer``'s (sharded) state and optionally ``model.state_dict()`` with DCP (collective)."""
    sd: dict[str, Any] = dict(get_optimizer_state_dict(optimizer, model))
    if model is not None:
        sd.update({f"model.{k}": v for k, v in model.state_dict().items()})
    _dcp(dcp.save, sd, optimizer, storage_writer=dcp.FileSystemWriter(str(path)))


# ----------------------------------------------------------------------------- load

def _compare(saved: Mapping[str, Any], here: Mapping[str, Any], path: Any) -> None:
    if saved["recipe"] != here["recipe"]:
        raise ValueError(f"checkpoint {path}: saved for recipe {saved['recipe']!r}, loading into {here['recipe']!r}")
    a, b = saved["params"], here["params"]
    if len(a) != len(b):
        raise ValueError(f"checkpoint {path}: saved {len(a)} parameters, this optimizer has {len(b)}")
    for x, y in zip(a, b):
        for field in ("name", "shape", "dtype", "locality", "blocks"):
            if x[field] != y[field]:
                raise ValueError(f"checkpoint {path}: parameter {y['name']!r}: saved {field} {x[field]!r}, "
                                 f"here {y[field]!r} (layout fingerprint mismatch)")


def _check(manifests: list[dict[str, Any]], view: _View, where: Any) -> dict[str, Any]:
    if not manifests:
        raise ValueError(f"checkpoint {where}: no distopt optimizer manifest (not written by distopt.distributed.checkpoint)")
    first = manifests[0]
    if first.get("version") != VERSION:
        raise ValueError(f"checkpoint {where}: manifest version {first.get('version')!r}, expected {VERSION}")
    _compare(first["fingerprint"], view.fingerprint(), where)
    if len(first["param_groups"]) != len(view.outer.param_groups):
        raise ValueError(f"checkpoint {where}: saved {len(first['param_groups'])} param groups, "
                         f"this optimizer has {len(view.outer.param_groups)}")
    return first


def _needed(view: _View, manifests: list[dict[str, Any]]) -> tuple[dict[str, Tensor], list[Any]]:
    """The saved tensors this rank's pieces overlap (allocated empty) and, per piece, the entries."""
    by_fqn: dict[str, list[dict[str, Any]]] = {}
    for m in manifests:
        for e in m["entries"]:
            by_fqn.setdefault(e["fqn"], []).append(e)
    wanted: dict[str, Tensor] = {}
    todo: list[tuple[Piece, Tensor, list[dict[str, Any]]]] = []
    for piece, t in view.local:
        need = []
        for e in by_fqn.get(view.names[piece.param], []):
            kind = e["kind"]
            if piece.is_slice:
                ok = kind in ("py", "scalar") or (kind == "slice" and e["start"] < piece.stop and e["stop"] > piece.start)
            elif piece.box is None:
                ok = kind in ("whole", "py")
            else:
                ok = (kind == "block" and e["block"] == piece.block) or kind == "py"
            if ok:
                need.append(e)
                if "key" in e:
                    wanted[e["key"]] = torch.empty(tuple(e["shape"]), dtype=getattr(torch, e["dtype"]))
        todo.append((piece, t, need))
    return wanted, todo


def _install(view: _View, first: dict[str, Any], wanted: Mapping[str, Tensor], todo: list[Any], where: Any) -> None:
    for piece, t, need in todo:
        p = view.params[piece.param]
        state: dict[str, Any] = {}
        cover: dict[str, int] = {}
        for e in need:
            buf = e["buf"]
            if e["kind"] == "py":
                state[buf] = _decode(e["value"])
                continue
            dev = torch.device("cpu") if e["cpu"] else p.device
            src = wanted[e["key"]]
            if e["kind"] == "slice":
                if buf not in state:
                    state[buf] = torch.empty(piece.stop - piece.start, dtype=src.dtype, device=dev)
                    cover[buf] = 0
                lo, hi = max(e["start"], piece.start), min(e["stop"], piece.stop)
                state[buf][lo - piece.start:hi - piece.start].copy_(src[lo - e["start"]:hi - e["start"]])
                cover[buf] += hi - lo
            else:
                state[buf] = src.to(dev, copy=True)
        if not state:
            continue
        for buf, got in cover.items():
            if got != piece.stop - piece.start:
                raise ValueError(f"checkpoint {where}: state {buf!r} of {view.names[piece.param]} covers {got} of "
                                 f"{piece.stop - piece.start} elements of this rank's slice")
            state[buf] = state[buf].view(t.shape)  # flat for a slice view, param-shaped in a plain optimizer
        view.state[t] = state
    for group, saved in zip(view.outer.param_groups, first["param_groups"]):
        group.update({k: _decode(v) for k, v in saved.items()})


def _manifests(keys: Any) -> list[str]:
    return sorted((k for k in keys if k.startswith(MANIFEST)), key=lambda k: int(k[len(MANIFEST):]))


def load(path: str | Path, optimizer: Any, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save` on any world size into ``optimizer`` (and
    ``model``, in place); collective. Returns rank 0's manifest header (fingerprint, world size,
    param groups)."""
    path = str(path)
    view = _View(optimizer, model)
    meta = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    bufs = {k: torch.empty(tuple(meta[k].size), dtype=torch.uint8) for k in _manifests(meta)}
    if bufs:
        _dcp(dcp.load, bufs, optimizer, storage_reader=SafeFileSystemReader(path))
    manifests = [_from_uint8(bufs[k]) for k in _manifests(bufs)]
    first = _check(manifests, view, path)
    wanted, todo = _needed(view, manifests)
    if model is not None:
        wanted.update({f"model.{k}": v for k, v in model.state_dict().items()})
    _dcp(dcp.load, wanted, optimizer, storage_reader=SafeFileSystemReader(path))
    _install(view, first, wanted, todo, path)
    if isinstance(optimizer, ZeroOptimizer):
        optimizer._sync_in()
    return {k: v for k, v in first.items() if k != "entries"}


def set_optimizer_state_dict(optimizer: Any, state_dict: Mapping[str, Tensor],
                             model: torch.nn.Module | None = None) -> None:
    """Load an in-memory flat state dict in the global layout (the union of every saving rank's
    :func:`get_optimizer_state_dict`, e.g. one process's) into ``optimizer``, resharding as needed."""
    view = _View(optimizer, model)
    manifests = [_from_uint8(state_dict[k]) for k in _manifests(state_dict)]
    first = _check(manifests, view, "state_dict")
    wanted, todo = _needed(view, manifests)
    missing = sorted(set(wanted) - set(state_dict))
    if missing:
        raise ValueError(f"checkpoint state_dict: missing {len(missing)} key(s), e.g. {missing[0]!r}")
    _install(view, first, {k: state_dict[k] for k in wanted}, todo, "state_dict")
    if isinstance(optimizer, ZeroOptimizer):
        optimizer._sync_in()


__all__ = ["SafeFileSystemReader", "get_optimizer_state_dict", "load", "save", "set_optimizer_state_dict"]

