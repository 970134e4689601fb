"""Amortized ``step()`` time of second-order recipes relative to distopt's AdamW.

The parameter set is a GPT-like transformer (:func:`gpt_shapes`: 12 layers 768 wide at
``scale=1``, i.e. GPT-2 small without embeddings; ``scale`` shrinks the width for CPU runs). Every
candidate gets its own copy of the same tensors with the same preset gradients. A *window* is
``2 * precondition_frequency`` consecutive steps, so it contains exactly two root / eigenbasis
refreshes: the time per step is window time / window length (amortized). Candidates are
interleaved within every repeat so that drift hits them alike; medians over repeats are reported,
and the ratio is ``t_candidate / t_adamw`` (< 1.3 is the target on GPU at frequency 10).

For ``muon`` the row ``torch.optim.Muon`` times torch's own Muon on the matrices plus torch's
AdamW (foreach) on the other tensors, the same split distopt's muon makes.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import distopt

FREQUENCY_HPARAM = {"shampoo": "precondition_frequency", "soap": "precondition_frequency"}


def gpt_shapes(scale: float = 1.0, layers: int = 12, width: int = 768, vocab: int = 0) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style stack: per layer LN, QKV (3d, d), proj (d, d), LN, MLP
    (4d, d) and (d, 4d) with biases; a final LN; an optional (vocab, d) embedding. The width is
    ``width * scale`` rounded to a multiple of 8 (at least 8)."""
    d = max(8, int(round(width * scale / 8)) * 8)
    per_layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    shapes = ([(vocab, d)] if vocab else []) + per_layer * layers + [(d,), (d,)]
    return shapes


def _tensors(shapes: list[tuple[int, ...]], device: str, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        p = (torch.randn(shape, generator=gen) * 0.02).to(device).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device)
        out.append(p)
    return out


class _Both:
    """Two optimizers stepped as one (torch's Muon on matrices + AdamW on the rest)."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:
        self.optimizers = optimizers

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()


def torch_muon(params: list[torch.Tensor]) -> _Both:
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    return _Both(torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1),
                 torch.optim.AdamW(others, lr=0.02, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0, foreach=True))


@dataclass
class Candidate:
    optimizer: str
    impl: str
    make: Callable[[list[torch.Tensor]], Any]


def candidates(names: list[str], precondition_frequency: int) -> list[Candidate]:
    out = [Candidate("adamw", "distopt", lambda ps: distopt.create("adamw", ps, lr=1e-3))]
    for name in names:
        extra = {FREQUENCY_HPARAM[name]: precondition_frequency} if name in FREQUENCY_HPARAM else {}
        out.append(Candidate(name, "distopt", lambda ps, n=name, e=extra: distopt.create(n, ps, **e)))
        if name == "muon" and hasattr(torch.optim, "Muon"):
            out.append(Candidate(name, "torch.optim.Muon", torch_muon))
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_second_order(names: list[str], shapes: list[tuple[int, ...]], repeats: int = 5, device: str = "cpu",
                       precondition_frequency: int = 10, progress: Callable[[str], None] | None = None,
                       clock: str = "wall") -> list[dict[str, Any]]:
    """One row per candidate: median ms per step (amortized over 2 precondition periods) and the
    ratio to distopt AdamW. A candidate that fails gets its ``error`` and no time.

    ``clock="process"`` measures this process's CPU time instead of wall time: steadier on a
    shared CPU machine (other jobs' load does not count), meaningless for CUDA."""
    if clock not in ("wall", "process"):
        raise ValueError(f"bench_second_order: clock must be 'wall' or 'process', got {clock!r}")
    now = time.perf_counter if clock == "wall" else time.process_time
    window = 2 * precondition_frequency
    live: list[tuple[Candidate, Any]] = []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for cand in candidates(names, precondition_frequency):
        rows[(cand.optimizer, cand.impl)] = {"optimizer": cand.optimizer, "impl": cand.impl, "ms_per_step": None,
                                             "ratio_vs_adamw": None, "error": None}
        try:
            if progress:
                progress(f"{cand.optimizer} ({cand.impl}): warm-up")
            opt = cand.make(_tensors(shapes, device))
            for _ in range(window):  # first window: lazy state, first roots, kernel warm-up
                opt.step()
            live.append((cand, opt))
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            rows[(cand.optimizer, cand.impl)]["error"] = f"{type(exc).__name__}: {exc}"
    times: dict[tuple[str, str], list[float]] = {(c.optimizer, c.impl): [] for c, _ in live}
    for r in range(repeats):
        if progress:
            progress(f"repeat {r + 1}/{repeats}")
        for cand, opt in live:
            _sync(device)
            t0 = now()
            for _ in range(window):
                opt.step()
            _sync(device)
            times[(cand.optimizer, cand.impl)].append(1e3 * (now() - t0) / window)
    for key, ts in times.items():
        rows[key]["ms_per_step"] = statistics.median(ts)
    base = rows[("adamw", "distopt")]["ms_per_step"]
    for row in rows.values():
        if row["ms_per_step"] is not None and base:
            row["ratio_vs_adamw"] = row["ms_per_step"] / base
    return list(rows.values())


def describe(shapes: list[tuple[int, ...]]) -> str:
    n = sum(torch.Size(s).numel() for s in shapes)
    return f"{n / 1e6:.2f}M params in {len(shapes)} tensors"
