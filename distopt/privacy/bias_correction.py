"""DP-Adam bias correction (Tang, Shpilevskiy & Lécuyer, "DP-AdamBC: Your DP-Adam Is Actually
DP-SGD (Unless You Apply Bias Correction)", AAAI 2024), as a recipe modification.

The private gradient is g̃ = ḡ + z/B with z ~ N(0, σ²C² I), so Adam's second moment estimates
E[g̃²] = E[ḡ²] + Φ with the known noise variance Φ = (σC/B)² per coordinate. DP-AdamBC
subtracts it before the root, with a floor γ' in place of Adam's ε:

    m_t = β1 m + (1-β1) g̃;   v_t = β2 v + (1-β2) g̃²;   m̂ = m_t/(1-β1^t);   v̂ = v_t/(1-β2^t)
    θ <- θ - lr · m̂ / sqrt(max(v̂ - Φ, γ'))

It only reads g̃ (already private) and public constants (σ, C, B), so it is post-processing: ε is
unchanged. Here it is a P operator (:class:`NoiseBiasCorrectedRootPreconditioner`) substituted
for :class:`~distopt.preconditioners.diagonal.RootMomentPreconditioner` in the optimizer's own
recipe (:func:`bias_corrected`) wherever that preconditioner reads ``exp_avg_sq`` written by a
:class:`~distopt.accumulators.moments.SecondMoment` fed by the private gradient itself (only a
deterministic shift such as coupled weight decay may come before it). That covers adam, adamw,
nadam(w), adamp, lamb, schedule_free_adamw, lookahead over those, and the AdamW branch of muon,
galore and apollo (their non-matrix params; a warning says so where another second moment, such
as GaLore's low-rank one, stays uncorrected). Recipes whose second moment is of something else (Adan's gradient
differences, MARS' corrected gradient, AdaBelief's centred moment), AMSGrad and
non-Adam recipes are refused with a clear error, as the subtraction of Φ would be wrong there.

Φ comes from the private optimizer at every step (:meth:`PrivateOptimizerMixin.noise_variance`),
so it follows noise schedulers, virtual steps and the world size.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Mapping

from torch import Tensor

from distopt.accumulators.moments import SecondMoment, bias_correction
from distopt.core.chain import Chain
from distopt.core.operator import Operator, Stage, StepContext
from distopt.preconditioners.diagonal import RootMomentPreconditioner
from distopt.scenarios.regularization import AddWeightDecay

#: operators that leave the noise of the incoming update unchanged (a deterministic shift, or none)
NOISE_NEUTRAL = (AddWeightDecay, SecondMoment)
SECOND_MOMENT_KEY = "exp_avg_sq"
DEFAULT_FLOOR = 1e-9  # γ' of the authors' CIFAR-10 DP-AdamBC script (eps_root)


class NoiseBiasCorrectedRootPreconditioner(Operator):
    """``u = (m / (1-β1^t)) / sqrt(max(v / (1-β2^t) - Φ, γ'))`` (DP-AdamBC, Tang et al., AAAI 2024)."""

    stage = Stage.P

    def __init__(self, noise_variance: float, floor: float, beta1: float, beta2: float,
                 key: str = SECOND_MOMENT_KEY) -> None:
        self.noise_variance, self.floor, self.beta1, self.beta2, self.key = noise_variance, floor, beta1, beta2, key

    def update(self, updates: list[Tensor], ctx: StepContext) -> list[Tensor]:
        c1 = bias_correction(self.beta1, ctx.steps) if self.beta1 else [1.0] * len(updates)
        denom = ctx.ops.div([s[self.key] for s in ctx.states], bias_correction(self.beta2, ctx.steps))
        ctx.ops.sub_(denom, self.noise_variance)
        ctx.ops.clamp_min_(denom, self.floor)
        ctx.ops.sqrt_(denom)
        ctx.ops.mul_(denom, c1)
        return ctx.ops.div(updates, denom)


def bias_corrected(recipe: Chain, noise_variance: float, floor: float) -> tuple[Chain, int]:
    """``recipe`` with every eligible RootMomentPreconditioner replaced; also the count replaced."""
    chain_, replaced, _ = _rewrite(recipe, noise_variance, floor, pure=True)
    return chain_, replaced


def _rewrite(recipe: Chain, phi: float, floor: float, pure: bool) -> tuple[Chain, int, int]:
    """(new chain, replaced, left): ``left`` counts exp_avg_sq preconditioners that are not of an
    Adam moment of the private gradient (GaLore's low-rank moments) and so stay uncorrected."""
    out: list[Operator] = []
    replaced = left = 0
    second_moment_beta: float | None = None
    for op in recipe:
        kind = type(op)
        if kind is SecondMoment and op.key == SECOND_MOMENT_KEY and pure:
            second_moment_beta = op.beta
        if kind is RootMomentPreconditioner and op.key == SECOND_MOMENT_KEY:
            if op.bias_correct and second_moment_beta is not None and op.beta2 == second_moment_beta:
                op = NoiseBiasCorrectedRootPreconditioner(phi, floor, op.beta1, op.beta2, op.key)
                replaced += 1
            else:
                left += 1
        else:
            branches = {k: v for k, v in vars(op).items() if isinstance(v, Chain)}
            if branches:  # a router over sub-chains (muon's RouteByNdim): rewrite each branch
                op = copy.copy(op)
                for name, branch in branches.items():
                    new, n, m = _rewrite(branch, phi, floor, pure)
                    setattr(op, name, new)
                    replaced, left = replaced + n, left + m
        out.append(op)
        pure = pure and isinstance(op, NOISE_NEUTRAL)
    return Chain(*out), replaced, left


def _name(optimizer: Any) -> str:
    return getattr(optimizer, "name", "") or type(optimizer).__name__


def supported_recipes() -> tuple[str, ...]:
    """Registered recipes that DP-AdamBC applies to (with their default hyperparameters)."""
    import distopt

    names = []
    for name in distopt.available():
        cls = distopt.get(name)
        try:
            if bias_corrected(cls.recipe({k: h.default for k, h in cls.hyperparameters().items()}), 0.0, 1.0)[1]:
                names.append(name)
        except Exception:  # noqa: BLE001 - a recipe that needs more than its defaults is simply not listed
            continue
    return tuple(names)


def check_bias_correction(optimizer: Any, floor: float) -> None:
    """Raise a ValueError (naming the recipe) if DP-AdamBC does not apply to ``optimizer``."""
    from distopt.core.shell import DistOptimizer

    if not (isinstance(floor, (int, float)) and floor > 0):
        raise ValueError(f"make_private: invalid bias_correction_floor={floor!r}; it must be > 0 (γ' of DP-AdamBC)")
    if not isinstance(optimizer, DistOptimizer):
        raise ValueError(f"make_private: bias_correction=True needs a distopt Adam-family recipe "
                         f"(e.g. distopt.create('adamw', ...)); got {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        _, replaced, left = _rewrite(optimizer.recipe(group), 0.0, floor, pure=True)
        if not replaced:
            hint = " (amsgrad=True is not covered by DP-AdamBC)" if group.get("amsgrad") else ""
            raise ValueError(
                f"make_private: bias_correction=True does not apply to {_name(optimizer)!r}{hint}: DP-AdamBC subtracts "
                "the noise variance (σC/B)² from an Adam second moment exp_avg_sq of the private gradient, and this "
                f"recipe has none. Recipes it applies to: {', '.join(supported_recipes())}"
            )
        if left:
            warnings.warn(f"bias_correction on {_name(optimizer)!r}: applied to its AdamW branch only; {left} "
                          "second-moment preconditioner(s) of transformed gradients (e.g. GaLore's low-rank moments) "
                          "stay uncorrected", stacklevel=3)


def install_bias_correction(optimizer: Any, noise_variance: Callable[[], float], floor: float) -> None:
    """Make ``optimizer`` (a distopt recipe optimizer) run DP-AdamBC: its recipe is rebuilt with
    :func:`bias_corrected` at every step, with Φ = ``noise_variance()``; torch's fused/foreach
    Adam kernels (which know nothing of Φ) are switched off for it. The patch lives on the
    instance (``optimizer.recipe`` / ``optimizer.fast_route``), its class is untouched."""
    check_bias_correction(optimizer, floor)
    base: Callable[[Mapping[str, Any]], Chain] = optimizer.recipe
    optimizer.recipe = lambda group: bias_corrected(base(group), noise_variance(), floor)[0]
    optimizer.fast_route = lambda group: None
