"""``make_private``: Opacus DP-SGD around any distopt optimizer, with the refusals that keep the
guarantee honest.

Opacus does everything private: its ``PrivacyEngine`` wraps the module for per-sample gradients
(``hooks``, ``functorch``, ``ew``) or per-sample norms (``ghost`` clipping, which returns a
criterion wrapper as a fourth object; ``ghost_bk``: distopt's single-backward book-keeping
variant, :mod:`distopt.privacy.book_keeping`, on Opacus' ghost optimizer and accountant),
replaces the data loader by Poisson sampling, and wraps the optimizer in its ``DPOptimizer``
family (flat / per-layer / adaptive clipping, the ``Distributed*`` variants when the module is
DDP/DPDDP-wrapped: noise is added once, on rank 0, before the all-reduce). ``DPOptimizer.step``
clips, sums, noises, scales and only then calls the wrapped optimizer's ``step()`` *without a
closure*, so a distopt recipe sees nothing but the private gradient: any recipe is post-processing.

distopt adds, on the Opacus optimizer object itself (its class is swapped for a subclass with
:class:`PrivateOptimizerMixin`, so it stays an Opacus ``DPOptimizer`` for Opacus' own tools such
as ``BatchMemoryManager`` and schedulers):

- ``privacy_spent(delta=None) -> (ε, δ)`` from the engine's accountant; ``.privacy`` (a
  :class:`~distopt.privacy.accounting.PrivacyState`) and ``.privacy_engine``;
- ``budget=ε_max``: the step that would exceed it raises
  :class:`~distopt.privacy.accounting.PrivacyBudgetExceeded` before it runs;
- ``state_dict()`` carries the accountant under the key ``"privacy"`` (weights_only-loadable);
- ``bias_correction=True``: DP-AdamBC (:mod:`distopt.privacy.bias_correction`);
- attribute forwarding to the wrapped optimizer (``optimizer.eval()`` of schedule-free recipes).

Refusals (:class:`NotPrivatizable`, a ValueError naming the optimizer and the alternative), read
from the optimizer before anything is wrapped:

- ``closure_kind == "forward"`` (zeroth-order: gradients are estimated from losses inside
  ``step(closure)``, never clipped) -> :func:`distopt.privacy.make_private_zo`;
- ``closure_kind == "create_graph"`` (Hessian-vector products re-evaluated through the graph of
  the non-private batch gradient: AdaHessian, Sophia, ...);
- a ``step`` that requires or re-evaluates the closure (a required ``closure`` argument, as
  ``torch.optim.LBFGS``, or a class attribute ``reevaluates_closure = True``);
- optimizer-in-backward: any parameter with post-accumulate-grad hooks or
  ``_in_backward_optimizers`` (the update would run on the raw gradient during backward);
- an optimizer that is already an Opacus ``DPOptimizer``.
"""
from __future__ import annotations

import functools
import inspect
import math
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from distopt.privacy.accounting import ACCOUNTANTS, PrivacyState, check_delta, opacus, resolve_noise_multiplier
from distopt.privacy.bias_correction import DEFAULT_FLOOR, _name, check_bias_correction, install_bias_correction
from distopt.privacy.book_keeping import book_keeping_engine
from distopt.privacy.in_place_noise import InPlaceNoiseMixin

GRAD_SAMPLE_MODES = ("hooks", "ghost", "ghost_bk", "functorch", "ew")
CRITERION_MODES = ("ghost", "ghost_bk")  # modes that return a criterion wrapper
CLIPPING = ("flat", "per_layer", "adaptive")


class NotPrivatizable(ValueError):
    """This optimizer cannot be made differentially private by per-sample clipping + noise."""


def _params(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for group in optimizer.param_groups:
        yield from group["params"]


def _closure_required(optimizer: Any) -> bool:
    try:
        sig = inspect.signature(inspect.unwrap(type(optimizer).step))
    except (TypeError, ValueError):
        return False
    closure = sig.parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def refusal(optimizer: Any) -> str | None:
    """Why ``optimizer`` cannot be made private by ``make_private``, or None if it can."""
    from opacus.optimizers import DPOptimizer

    name = _name(optimizer)
    if isinstance(optimizer, DPOptimizer):
        return (f"{name} is already an Opacus DPOptimizer; pass the plain optimizer to make_private once "
                "(wrapping twice would clip and noise twice and account once)")
    kind = getattr(type(optimizer), "closure_kind", "backward")
    if kind == "forward":
        return (f"{name} is a zeroth-order recipe (closure_kind='forward'): it estimates its gradient from loss "
                "values at perturbed parameters inside step(closure), which per-sample clipping never sees. "
                "Use distopt.privacy.make_private_zo(...) (DP-ZO: clipped per-example projected-gradient scalars "
                "plus Gaussian noise, accounted by the same Opacus accountant)")
    if kind == "create_graph":
        return (f"{name} needs backward(create_graph=True) (closure_kind='create_graph'): it re-evaluates "
                "Hessian-vector products through the graph of the raw batch gradient, which is neither clipped per "
                "example nor noised, and Opacus' DPOptimizer calls step() without a closure. Use a first-order or "
                "gradient-only preconditioned recipe (adamw, lion, muon, shampoo-style Kronecker recipes, ...)")
    if kind != "backward":
        return f"{name} declares closure_kind={kind!r}, which make_private does not know how to keep private"
    if getattr(optimizer, "reevaluates_closure", False) or _closure_required(optimizer):
        return (f"{name}.step() requires and re-evaluates the closure (e.g. a line search): those extra loss and "
                "gradient evaluations would be non-private, and Opacus' DPOptimizer calls step() without a "
                "closure. Use an optimizer that steps on the given gradient (adamw, lion, muon, sgd, ...)")
    for p in _params(optimizer):
        if getattr(p, "_post_accumulate_grad_hooks", None) or hasattr(p, "_in_backward_optimizers"):
            return (f"{name}: parameters carry post-accumulate-grad hooks (optimizer-in-backward): they would update "
                    "on the raw, unclipped gradient during backward, before Opacus clips and noises it. Remove the "
                    "hooks and call optimizer.step() after backward")
    return None


class PrivateOptimizerMixin:
    """Added in front of the Opacus optimizer class by :func:`make_private` (see module docstring)."""

    privacy: PrivacyState
    _noise_variance: float = 0.0

    def privacy_spent(self, delta: float | None = None) -> tuple[float, float]:
        """``(ε, δ)`` spent so far (``delta`` defaults to make_private's ``target_delta``)."""
        return self.privacy.spent(delta)

    def _accumulated(self) -> int:
        try:
            return int(self.accumulated_iterations)  # type: ignore[attr-defined]
        except (ValueError, AttributeError, IndexError):
            return 1

    def pre_step(self, closure: Any = None) -> bool:
        if not self._check_skip_next_step(pop_next=False):  # type: ignore[attr-defined]  # a real step
            self.privacy.check_next_step(self.noise_multiplier,  # type: ignore[attr-defined]
                                         self.privacy.sample_rate * self._accumulated())
        divisor = (self.expected_batch_size * self._accumulated()  # type: ignore[attr-defined]
                   if self.loss_reduction == "mean" else 1.0)  # type: ignore[attr-defined]
        done = super().pre_step(closure)  # type: ignore[misc]
        if done:
            if self.loss_reduction == "mean":  # type: ignore[attr-defined]
                divisor *= getattr(self, "world_size", 1)  # Distributed*: all-reduce averages over ranks
            self._noise_variance = (self.noise_multiplier * self.max_grad_norm / divisor) ** 2  # type: ignore[attr-defined]
        return done

    def noise_variance(self) -> float:
        """Per-coordinate variance (σC/B)² of the noise in the gradient the wrapped optimizer sees
        at this step (Φ of DP-AdamBC)."""
        return self._noise_variance

    def state_dict(self) -> dict[str, Any]:
        state = dict(super().state_dict())  # type: ignore[misc]
        state["privacy"] = self.privacy.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        privacy = state.pop("privacy", None)
        super().load_state_dict(state)  # type: ignore[misc]
        if privacy is None:
            warnings.warn("load_state_dict: the checkpoint has no 'privacy' entry (a non-private optimizer's state); "
                          "the accountant keeps its current history", stacklevel=2)
        else:
            self.privacy.load_state_dict(privacy)

    def __getattr__(self, name: str) -> Any:
        # only reached for names the Opacus wrapper lacks: forward to the wrapped optimizer
        if name.startswith("__") or "original_optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["original_optimizer"], name)


@functools.lru_cache(maxsize=None)
def private_class(base: type, *mixins: type) -> type:
    """``base`` (an Opacus DPOptimizer class) with :class:`PrivateOptimizerMixin` (and ``mixins``) in front."""
    return type(f"Private{base.__name__}", (PrivateOptimizerMixin, *mixins, base), {"__module__": __name__})


def _check_max_grad_norm(max_grad_norm: Any, clipping: str) -> None:
    values = max_grad_norm if isinstance(max_grad_norm, (list, tuple)) and clipping == "per_layer" else [max_grad_norm]
    if not all(isinstance(c, (int, float)) and math.isfinite(c) and c > 0 for c in values):
        raise ValueError(f"make_private: invalid max_grad_norm={max_grad_norm!r}; it must be a finite float > 0"
                         + (" (or a list of them with clipping='per_layer')" if clipping == "per_layer" else ""))


def make_private(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float = 1e-5,
    epochs: float | None = None,
    max_grad_norm: float | list[float],
    clipping: str = "flat",
    grad_sample_mode: str = "hooks",
    accountant: str = "prv",
    poisson_sampling: bool = True,
    bias_correction: bool = False,
    bias_correction_floor: float = DEFAULT_FLOOR,
    budget: float | None = None,
    criterion: Any = None,
    loss_reduction: str = "mean",
    noise_generator: torch.Generator | None = None,
    secure_mode: bool = False,
    **opacus_kwargs: Any,
) -> tuple:
    """Make ``(module, optimizer, data_loader)`` differentially private with Opacus.

    Returns ``(module, optimizer, data_loader)`` like ``PrivacyEngine.make_private``, or
    ``(module, optimizer, criterion, data_loader)`` with ``grad_sample_mode="ghost"`` (use the
    returned criterion for the loss: its ``backward()`` runs ghost clipping's two passes; it
    wraps ``criterion``, by default ``nn.CrossEntropyLoss()`` as in Opacus) and with
    ``grad_sample_mode="ghost_bk"`` (the same objects and gradients, but ``backward()`` is one
    pass: book-keeping ghost clipping, :mod:`distopt.privacy.book_keeping`; flat clipping; DDP or DPDDP, not FSDP).

    Give exactly one of ``noise_multiplier`` (σ) or ``target_epsilon`` with ``epochs`` (σ from
    Opacus' ``get_noise_multiplier`` with the chosen ``accountant``). ``budget=ε_max`` refuses
    the step that would exceed ε_max at ``target_delta``. ``bias_correction=True`` applies
    DP-AdamBC to Adam-family recipes with floor ``bias_correction_floor`` (γ').
    Other keyword arguments go to ``PrivacyEngine.make_private`` (``batch_first``, adaptive
    clipping's ``target_unclipped_quantile``, ...). Opacus' warning about secure RNG stays.
    """
    opacus()
    from opacus import PrivacyEngine

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"make_private: invalid accountant={accountant!r}; it must be one of {', '.join(ACCOUNTANTS)}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"make_private: invalid grad_sample_mode={grad_sample_mode!r}; "
                         f"it must be one of {', '.join(GRAD_SAMPLE_MODES)}")
    if clipping not in CLIPPING:
        raise ValueError(f"make_private: invalid clipping={clipping!r}; it must be one of {', '.join(CLIPPING)}")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"make_private: invalid loss_reduction={loss_reduction!r}; it must be 'mean' or 'sum'")
    _check_max_grad_norm(max_grad_norm, clipping)
    target_delta = check_delta(target_delta)
    reason = refusal(optimizer)
    if reason:
        raise NotPrivatizable(f"make_private: {reason}")
    if bias_correction and clipping == "adaptive":
        raise ValueError("make_private: bias_correction=True needs a fixed clipping bound; clipping='adaptive' "
                         "changes C and the noise scale every step")
    if bias_correction:  # before anything is wrapped
        check_bias_correction(optimizer, bias_correction_floor)
    if len(data_loader) == 0:
        raise ValueError("make_private: the data loader is empty")
    sample_rate = 1.0 / len(data_loader)
    sigma = resolve_noise_multiplier(noise_multiplier, target_epsilon, target_delta, epochs, sample_rate, accountant)
    privacy = PrivacyState(None, sample_rate=sample_rate, target_delta=target_delta, budget=budget,  # validates budget
                           noise_multiplier=sigma, max_grad_norm=0.0, generator=noise_generator)

    engine_class = book_keeping_engine() if grad_sample_mode == "ghost_bk" else PrivacyEngine
    engine = engine_class(accountant=accountant, secure_mode=secure_mode)
    kwargs = dict(module=module, optimizer=optimizer, data_loader=data_loader, noise_multiplier=sigma,
                  max_grad_norm=max_grad_norm, clipping=clipping, poisson_sampling=poisson_sampling,
                  grad_sample_mode="ghost" if grad_sample_mode == "ghost_bk" else grad_sample_mode,
                  loss_reduction=loss_reduction, noise_generator=noise_generator)
    if grad_sample_mode in CRITERION_MODES:
        kwargs["criterion"] = criterion if criterion is not None else nn.CrossEntropyLoss(reduction=loss_reduction)
    elif criterion is not None:
        raise ValueError("make_private: criterion= is only used with grad_sample_mode='ghost' or 'ghost_bk'")
    out = engine.make_private(**kwargs, **opacus_kwargs)

    dp_optimizer = out[1]
    lean = (InPlaceNoiseMixin,) if grad_sample_mode == "ghost_bk" else ()  # no full-size copies in the step
    dp_optimizer.__class__ = private_class(type(dp_optimizer), *lean)
    privacy.accountant = engine.accountant
    privacy.sample_rate = 1.0 / len(out[-1])  # what the engine attached to its accounting hook
    privacy.max_grad_norm = float(dp_optimizer.max_grad_norm)
    dp_optimizer.privacy = privacy
    dp_optimizer.privacy_engine = engine
    if bias_correction:
        install_bias_correction(optimizer, dp_optimizer.noise_variance, bias_correction_floor)
    return out

