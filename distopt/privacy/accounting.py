"""Privacy accounting state shared by :func:`~distopt.privacy.make_private` and
:func:`~distopt.privacy.make_private_zo`: Opacus' own accountant (RDP, PRV or GDP) plus what is
needed to report ``(ε, δ)``, to refuse a step that would exceed a budget, and to checkpoint.

The accountant is never re-implemented: ``PrivacyState.accountant`` *is* an
``opacus.accountants.IAccountant``; its history ``[(σ, q, steps), ...]`` is the whole record.

Budget. With ``budget=ε_max`` every real optimizer step first asks whether the accountant's
history *plus this step* stays within ``ε_max`` at ``target_delta``; if not,
:class:`PrivacyBudgetExceeded` is raised before any noise is drawn or parameter touched, so the
parameters, optimizer state and accountant are those after the last allowed step (a valid
checkpoint). Evaluating ε at every step would cost one accountant call per step (PRV: 40 ms at
10 steps, 6 s at 10⁵ steps, measured on a 2-core CPU), so the largest number of further steps at
the current ``(σ, q)`` is found once by exponential + binary search with the same accountant
and cached by ``(σ, q, history prefix, budget, δ)``. Both ε(allowed) ≤ ε_max and
ε(allowed + 1) > ε_max are values the search actually evaluated, so the refusal is consistent
with :meth:`PrivacyState.spent` even where PRV's numerics are not exactly monotone.

Checkpoints. :meth:`PrivacyState.state_dict` holds only strings, numbers, lists and (for the
noise generator) a uint8 tensor, so ``torch.load(..., weights_only=True)`` restores it.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch

ACCOUNTANTS = ("rdp", "prv", "gdp")
STATE_VERSION = 1


def opacus() -> Any:
    """Import opacus or raise one ImportError naming the extra to install."""
    try:
        import opacus as module
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError('distopt.privacy needs Opacus; install it with: pip install "distopt[dp]"') from exc
    return module


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the privacy budget; it was refused before it ran.

    Attributes: ``epsilon_spent`` (ε after the last allowed step), ``epsilon_next`` (ε that the
    refused step would have reached, ``inf`` if not evaluated), ``budget``, ``delta``, ``steps``
    (optimizer steps taken so far)."""

    def __init__(self, epsilon_spent: float, epsilon_next: float, budget: float, delta: float, steps: int) -> None:
        self.epsilon_spent, self.epsilon_next = epsilon_spent, epsilon_next
        self.budget, self.delta, self.steps = budget, delta, steps
        super().__init__(
            f"privacy budget exhausted: {steps} steps spent ε={epsilon_spent:.4g} (δ={delta:g}); the next step "
            f"would reach ε={epsilon_next:.4g} > budget {budget:g}. It was refused before running, so the "
            "parameters, optimizer state and accountant are those after the last allowed step (save them now)."
        )


def check_delta(delta: float, name: str = "target_delta") -> float:
    if not (isinstance(delta, (int, float)) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"make_private: invalid {name}={delta!r}; it must be in (0, 1)")
    return float(delta)


def resolve_noise_multiplier(
    noise_multiplier: float | None, target_epsilon: float | None, target_delta: float, epochs: float | None,
    sample_rate: float, accountant: str, caller: str = "make_private",
) -> float:
    """σ from exactly one of ``noise_multiplier`` or ``target_epsilon`` (+ ``epochs``), the
    latter through Opacus' ``get_noise_multiplier`` with the same accountant."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            f"{caller}: give exactly one of noise_multiplier=σ or target_epsilon=ε (with epochs=); "
            f"got noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}"
        )
    if noise_multiplier is not None:
        if epochs is not None:
            raise ValueError(f"{caller}: epochs={epochs!r} is only used with target_epsilon; drop it or give "
                             "target_epsilon instead of noise_multiplier")
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
            raise ValueError(f"{caller}: invalid noise_multiplier={noise_multiplier!r}; it must be a finite float >= 0")
        return float(noise_multiplier)
    if epochs is None:
        raise ValueError(f"{caller}: target_epsilon={target_epsilon!r} needs epochs= (the planned number of epochs) "
                         "to calibrate the noise multiplier")
    if not (isinstance(target_epsilon, (int, float)) and target_epsilon > 0):
        raise ValueError(f"{caller}: invalid target_epsilon={target_epsilon!r}; it must be > 0")
    if not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ValueError(f"{caller}: invalid epochs={epochs!r}; it must be > 0")
    return _calibrated_sigma(float(target_epsilon), target_delta, sample_rate, float(epochs), accountant)


@functools.lru_cache(maxsize=256)
def _calibrated_sigma(target_epsilon: float, target_delta: float, sample_rate: float, epochs: float,
                      accountant: str) -> float:
    """Opacus' ``get_noise_multiplier`` (a bisection over σ: seconds with PRV), memoised."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta,
                                      sample_rate=sample_rate, epochs=epochs, accountant=accountant))


@functools.lru_cache(maxsize=4096)
def _epsilon_of(accountant_class: type, history: tuple, delta: float) -> float:
    """ε of an accountant history (a pure function of it: memoised, as RDP/PRV take 0.05-1 s)."""
    if not history:
        return 0.0
    if any(sigma == 0 and q > 0 and n > 0 for sigma, q, n in history):
        return math.inf  # a noiseless step releases the gradient itself (and PRV's domain overflows)
    scratch = accountant_class()
    scratch.history = [tuple(h) for h in history]
    return float(scratch.get_epsilon(delta))


class PrivacyState:
    """An Opacus accountant with its sampling rate, δ, optional budget and noise generator.

    ``spent(delta)`` -> ``(ε, δ)``; ``check_next_step(σ, q)`` raises
    :class:`PrivacyBudgetExceeded`; ``record(σ, q)`` adds one step (the DP-SGD path lets Opacus'
    own step hook do that); ``state_dict()`` / ``load_state_dict()`` round-trip exactly.
    """

    def __init__(self, accountant: Any, *, sample_rate: float, target_delta: float, budget: float | None = None,
                 noise_multiplier: float = 0.0, max_grad_norm: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        if budget is not None and not (isinstance(budget, (int, float)) and budget > 0):
            raise ValueError(f"make_private: invalid budget={budget!r}; it must be an ε > 0 or None")
        self.accountant = accountant
        self.sample_rate = float(sample_rate)
        self.target_delta = check_delta(target_delta)
        self.budget = None if budget is None else float(budget)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.generator = generator
        self._limit_cache: dict[tuple, tuple[int, float, float]] = {}  # key -> (n_max, ε(n_max), ε(n_max + 1))

    @property
    def mechanism(self) -> str:
        return self.accountant.mechanism()

    @property
    def steps(self) -> int:
        """Optimizer steps recorded by the accountant."""
        return int(sum(n for _, _, n in self.accountant.history))

    def _epsilon(self, history: list, delta: float) -> float:
        return _epsilon_of(type(self.accountant), tuple(map(tuple, history)), delta)

    def spent(self, delta: float | None = None) -> tuple[float, float]:
        """``(ε, δ)`` spent so far, from the accountant (``delta`` defaults to ``target_delta``)."""
        delta = self.target_delta if delta is None else check_delta(delta, "delta")
        return self._epsilon(self.accountant.history, delta), delta

    def record(self, noise_multiplier: float, sample_rate: float | None = None) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier,
                             sample_rate=self.sample_rate if sample_rate is None else sample_rate)

    def _split(self, sigma: float, q: float) -> tuple[list, int]:
        """History prefix and the count of trailing steps at exactly ``(σ, q)`` (Opacus merges them)."""
        history = list(self.accountant.history)
        if history and history[-1][0] == sigma and history[-1][1] == q:
            return history[:-1], int(history[-1][2])
        return history, 0

    def check_next_step(self, noise_multiplier: float, sample_rate: float | None = None) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step at ``(σ, q)`` would exceed the budget."""
        if self.budget is None:
            return
        sigma, q = float(noise_multiplier), self.sample_rate if sample_rate is None else float(sample_rate)
        prefix, done = self._split(sigma, q)
        n_max, eps_at_max, eps_after = self._limits(prefix, sigma, q)
        if done + 1 > n_max:
            if done == n_max:
                eps_now, eps_next = eps_at_max, eps_after
            else:  # already past the budget (a lowered budget, a loaded checkpoint)
                eps_now = self._epsilon(prefix + [(sigma, q, done)], self.target_delta)
                eps_next = self._epsilon(prefix + [(sigma, q, done + 1)], self.target_delta)
            raise PrivacyBudgetExceeded(eps_now, eps_next, self.budget, self.target_delta, self.steps)

    def _limits(self, prefix: list, sigma: float, q: float) -> tuple[int, float, float]:
        """:meth:`_max_steps`, cached by everything it depends on."""
        key = (sigma, q, tuple(map(tuple, prefix)), self.budget, self.target_delta)
        if key not in self._limit_cache:
            self._limit_cache[key] = self._max_steps(prefix, sigma, q)
        return self._limit_cache[key]

    def _max_steps(self, prefix: list, sigma: float, q: float) -> tuple[int, float, float]:
        """Largest n with ε(prefix + n steps at (σ, q)) ≤ budget, with ε at n and at n + 1."""
        eps = lambda n: self._epsilon(prefix + ([(sigma, q, n)] if n else []), self.target_delta)  # noqa: E731
        budget = self.budget
        lo, eps_lo = 0, eps(0)
        if eps_lo > budget:
            return 0, eps_lo, eps_lo
        if q == 0.0:  # never sampled: free
            return 2**62, eps_lo, eps_lo
        if sigma == 0.0:  # no noise: a single step has unbounded ε
            return 0, eps_lo, math.inf
        hi = 1
        while True:  # exponential search for a failing n
            e = eps(hi)
            if e > budget:
                eps_hi = e
                break
            lo, eps_lo, hi = hi, e, hi * 2
            if hi > 2**40:
                return 2**62, eps_lo, eps_lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            e = eps(mid)
            if e > budget:
                hi, eps_hi = mid, e
            else:
                lo, eps_lo = mid, e
        return lo, eps_lo, eps_hi

    def remaining_steps(self, noise_multiplier: float | None = None, sample_rate: float | None = None) -> int | None:
        """Steps still allowed by the budget at ``(σ, q)`` (None without a budget)."""
        if self.budget is None:
            return None
        sigma = self.noise_multiplier if noise_multiplier is None else float(noise_multiplier)
        q = self.sample_rate if sample_rate is None else float(sample_rate)
        prefix, done = self._split(sigma, q)
        return max(0, self._limits(prefix, sigma, q)[0] - done)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain data (weights_only-loadable): accountant history and mechanism, settings, RNG."""
        out: dict[str, Any] = {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "history": [[float(s), float(q), int(n)] for s, q, n in self.accountant.history],
            "sample_rate": self.sample_rate,
            "target_delta": self.target_delta,
            "budget": self.budget,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
        }
        if self.generator is not None:
            out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"privacy state: unsupported version {state.get('version')!r}")
        if state["mechanism"] != self.mechanism:
            raise ValueError(f"privacy state: checkpoint accountant is {state['mechanism']!r} but this optimizer uses "
                             f"{self.mechanism!r}; make_private(..., accountant={state['mechanism']!r}) to resume")
        # through Opacus' own loader (it validates the mechanism), with tuples as Opacus writes them
        self.accountant.load_state_dict({"history": [(float(s), float(q), int(n)) for s, q, n in state["history"]],
                                         "mechanism": state["mechanism"]})
        self.sample_rate = float(state["sample_rate"])
        self.target_delta = float(state["target_delta"])
        self.budget = None if state["budget"] is None else float(state["budget"])
        self.noise_multiplier = float(state["noise_multiplier"])
        self.max_grad_norm = float(state["max_grad_norm"])
        if "generator_state" in state and self.generator is not None:
            self.generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        eps, delta = self.spent()
        return (f"PrivacyState({self.mechanism}, steps={self.steps}, ε={eps:.4g}, δ={delta:g}, q={self.sample_rate:.4g}, "
                f"σ={self.noise_multiplier:.4g}, budget={self.budget})")
