"""Each optimizer's declared search space: a base learning rate, fixed hyperparameters and an lr grid.

The survey tunes only the learning rate, on the 5-point grid ``base × {0.1, 0.2, 1, 5, 10}``, and
keeps every other hyperparameter at its default; distopt does the same with an equal budget for
every optimizer (AdamW included): each gets exactly ``len(grid)`` tuning runs. The base is also the
single configuration of the *self-tuning* track (one setting for every workload).

Entries: ``base_lr``; ``hparams`` (fixed, passed to ``distopt.create``); ``lr_keys`` (other group
keys that scale with lr, as ``{key: ratio}``); ``schedule`` (``"cosine"``: linear warm-up over 5 %
of the budget then cosine decay to 10 %; ``"constant"``: the same warm-up then constant, for
schedule-free methods); ``cpu_hparams`` (overrides on CPU, e.g. Newton–Schulz in float32 since
CPUs have no fast bfloat16 matmul; the math is the same). Optimizers without an entry get
their own default lr and the default grid.

Bases were set from calibration passes of the survey grid and of the default suite on ``cnn_digits``
and ``llama_char`` (short CPU budgets favour larger rates than the papers' defaults), so that the best
grid point is rarely at an edge on the small workloads; the report flags (``*``) optimizers whose tuned
lr sits at the edge of their grid. SGD is the exception: its best rate differs ~25x between the CNN
(large) and the LM (small), wider than the default 3-point grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import distopt

SURVEY_GRID = (0.1, 0.2, 1.0, 5.0, 10.0)
"""The survey's lr factors around each optimizer's base lr."""

SHORT_GRID = (0.2, 1.0, 5.0)
"""The default suite's shorter grid (a subset of the survey's)."""

SENSITIVITY_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Factor-2 grid around the tuned lr for the sensitivity curves (``--suite full``/``survey``)."""


@dataclass(frozen=True)
class Space:
    base_lr: float
    hparams: dict[str, Any] = field(default_factory=dict)
    grid: tuple[float, ...] = SURVEY_GRID
    lr_keys: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"
    cpu_hparams: dict[str, Any] = field(default_factory=dict)

    def lrs(self, grid: tuple[float, ...] | None = None) -> list[float]:
        return [round_lr(self.base_lr * f) for f in (grid or self.grid)]


SEARCH_SPACE: dict[str, Space] = {
    # Adam family: 3e-3 is the centre that the short CPU budgets favour (calibrated on cnn_digits and
    # llama_char with the survey grid: AdamW's best was 5e-3..1e-2); the 0.1x..10x grid spans 3e-4..3e-2.
    "adamw": Space(3e-3),
    "adam": Space(3e-3),
    "nadam": Space(3e-3),
    "nadamw": Space(3e-3),
    "radam": Space(3e-3),
    "adabelief": Space(3e-3),
    "adamp": Space(3e-3),
    "laprop": Space(3e-3),
    "adopt": Space(3e-3),
    "adan": Space(3e-3),
    "mars": Space(3e-3),
    "adamax": Space(5e-3),
    "adam_mini": Space(3e-3),
    "adamw8bit": Space(3e-3),
    "galore": Space(3e-3),
    "apollo": Space(3e-3),
    "apollo_mini": Space(3e-3),
    "lookahead": Space(3e-3, {"base": "adamw", "k": 5, "alpha": 0.5}),
    "lamb": Space(2e-2),
    "lion": Space(1e-3),  # Lion wants 3-10x less than AdamW (Chen et al., 2023); short runs favour more
    "adafactor": Space(3e-2),
    "sgd": Space(0.05, {"momentum": 0.9, "nesterov": True}),  # timm's "sgd" is Nesterov SGD, momentum 0.9
    "sgdp": Space(0.05, {"momentum": 0.9, "nesterov": True}),
    "lars": Space(1.0, {"momentum": 0.9}),  # the trust ratio (coefficient 1e-3) scales the step down
    "rmsprop": Space(1e-3),
    "adagrad": Space(2e-2),
    "novograd": Space(1e-2),
    "madgrad": Space(3e-3),
    "muon": Space(2e-2, {"adjust_lr_fn": "match_rms_adamw"}, cpu_hparams={"ns_dtype": None}),
    "psgd_kron": Space(1e-3),
    "shampoo": Space(3e-3),
    "soap": Space(3e-3),
    "schedule_free_adamw": Space(5e-3, schedule="constant"),
    "schedule_free_sgd": Space(0.5, {"momentum": 0.9}, schedule="constant"),
}

SURVEY_OPTIMIZERS: dict[str, str] = {
    "muon": "muon", "kron": "psgd_kron", "lion": "lion", "adafactor": "adafactor", "adamp": "adamp",
    "nadamw": "nadamw", "adamw": "adamw", "laprop": "laprop", "lamb": "lamb", "madgrad": "madgrad",
    "mars": "mars", "adam": "adam", "adan": "adan", "radam": "radam", "nadam": "nadam",
    "adabelief": "adabelief", "sgdp": "sgdp", "novograd": "novograd", "adopt": "adopt", "sgd": "sgd",
    "lookahead": "lookahead", "lars": "lars", "rmsprop": "rmsprop",
}
"""The survey's 23 optimizers: timm factory name -> distopt name."""


def round_lr(lr: float) -> float:
    """Learning rates are kept to 4 significant digits so equal grid points share a cache key."""
    return float(f"{lr:.4g}")


def space(name: str) -> Space:
    """The declared space of ``name`` (the optimizer's default lr and the survey grid if undeclared)."""
    if name in SEARCH_SPACE:
        return SEARCH_SPACE[name]
    lr = distopt.get(name).hyperparameters().get("lr")
    return Space(float(lr.default) if lr is not None and lr.default else 1e-3)


def hparams_for(name: str, device: str = "cpu") -> dict[str, Any]:
    """Fixed hyperparameters of ``name`` on ``device`` (only those the optimizer declares)."""
    s = space(name)
    out = dict(s.hparams)
    if not device.startswith("cuda"):
        out.update(s.cpu_hparams)
    return out


__all__ = ["SEARCH_SPACE", "SENSITIVITY_FACTORS", "SHORT_GRID", "SURVEY_GRID", "SURVEY_OPTIMIZERS", "Space",
           "hparams_for", "round_lr", "space"]
