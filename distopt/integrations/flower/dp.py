"""Sample-level DP inside each federated client, with ε accumulated across rounds.

Every round a client trains with DP-SGD around its distopt recipe (Opacus' per-sample clipping,
Gaussian noise, Poisson sampling) through :func:`distopt.privacy.make_private` (``accountant=
"rdp"``). A ClientApp object lives for one message only, so the accountant's *history*
``[(σ, q, steps), ...]`` is persisted in the client's Flower ``Context.state`` (a ConfigRecord
of three lists) and restored before the next round's first step: the ε a client reports after
``r`` rounds of ``K`` steps is the accountant's ε for ``r·K`` steps at ``(σ, q)``, not the
ε of one round. (Opacus merges consecutive steps at the same ``(σ, q)``, so the history stays
one entry long.)

Client-level DP (the server clips every client's update and adds noise to the aggregate,
McMahan et al. 2018) is Flower's own strategy wrapper, see
:func:`distopt.integrations.flower.strategies.build_strategy` (``client_dp=``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from distopt.integrations.flower._deps import option

STATE_KEY = "distopt-dp-accountant"


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD settings of a client: noise multiplier σ, clipping bound C, δ for reporting ε."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"dp: noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"dp: max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp: delta must be in (0, 1), got {self.delta}")

    @classmethod
    def of(cls, value: Any) -> "SampleDP | None":
        return option(cls, value, "dp")


def load_history(state: Any) -> list[tuple[float, float, int]]:
    """The accountant history stored in a Flower ``Context.state`` (empty on the first round)."""
    if STATE_KEY not in state.config_records:
        return []
    rec = state.config_records[STATE_KEY]
    return [(float(s), float(q), int(n)) for s, q, n in zip(rec["sigma"], rec["rate"], rec["steps"])]


def save_history(state: Any, history: list) -> None:
    from flwr.app import ConfigRecord

    state[STATE_KEY] = ConfigRecord({
        "sigma": [float(s) for s, _, _ in history] or [0.0],
        "rate": [float(q) for _, q, _ in history] or [0.0],
        "steps": [int(n) for _, _, n in history] or [0],
    })


def epsilon(history: list, delta: float) -> float:
    """ε of an RDP accountant with this history (Opacus' ``RDPAccountant``)."""
    from opacus.accountants import RDPAccountant

    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta))


def make_private_client(
    model: nn.Module, optimizer: Any, loader: DataLoader, config: SampleDP, history: list
) -> tuple[nn.Module, Any, DataLoader, Any]:
    """Wrap ``(model, optimizer, loader)`` for DP-SGD with the accountant restored from
    ``history``; returns them plus a function giving the updated history after training."""
    try:
        from distopt.privacy import make_private
    except ImportError:  # pragma: no cover - distopt.privacy ships with distopt; opacus is the extra
        make_private = None
    if make_private is not None:
        module, dp_opt, dp_loader = make_private(
            model, optimizer, loader, noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
            accountant="rdp", target_delta=config.delta,
        )
        state = dp_opt.privacy.state_dict()
        state["history"] = [list(h) for h in history]
        dp_opt.privacy.load_state_dict(state)
        accountant = dp_opt.privacy.accountant
    else:  # plain Opacus
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = list(history)
        module, dp_opt, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
        )
        accountant = engine.accountant
    return module, dp_opt, dp_loader, lambda: [tuple(h) for h in accountant.history]


__all__ = ["SampleDP", "epsilon", "load_history", "make_private_client", "save_history"]
