"""DP-ZO: differentially private zeroth-order training (Tang, Panda, Nasr, Mahloujifar & Mittal,
"Private Fine-tuning of Large Language Models with Zeroth-order Optimization", 2024; the same
mechanism as DPZero, Zhang et al. 2023).

A two-point step moves along one random direction z ~ N(0, I) (regenerated from a seed, never
stored) by a *scalar*, so privacy only has to protect that scalar:

    s_i = (ℓ_i(θ + εz) - ℓ_i(θ - εz)) / 2ε            per example i of the Poisson batch
    ĝ   = (Σ_i clip(s_i, -C, C) + N(0, σ²C²)) / B      B = expected batch size (Opacus' convention)
    θ  <- update(θ, ĝ·z)                                z is public (data-independent)

Adding or removing one example changes Σ_i clip(s_i) by at most C, so each step is the
Poisson-subsampled Gaussian mechanism with noise multiplier σ; Opacus' accountant (RDP / PRV /
GDP) is stepped with exactly (σ, q) once per step. Everything after ĝ is post-processing.

How it plugs in (two update paths, one privacy mechanism).

- A distopt zeroth-order recipe (:class:`distopt.zo.ZOOptimizer`: ``zo_sgd``, ``zo_adam``,
  ``zo_sgd_momentum``, ``zo_sgd_sign``, ``lozo``, ``sparse_mezo``, ``hizoo``) keeps its own
  directions (counter-based, low-rank, masked, Hessian-scaled), perturbation mode and chain. DP-ZO
  runs the recipe's probe with a closure that returns *per-example* losses, turns them into
  per-example scalar vectors with the recipe's own estimator (linear in the losses, so it is
  applied to the loss vectors directly), privatizes them, and applies the step with the private
  scalars: everything the recipe does after the scalars is post-processing. A recipe with m > 1 scalars per step (n perturbations, or HiZOO's n gradient
  + n curvature terms, which also update its Hessian state) is privatized as one vector: each
  example's m-vector is clipped to L2 norm C and N(0, σ²C² I_m) is added, the Gaussian mechanism
  with the same sensitivity C (m = 1 is the [-C, C] clip above). Refused: ``zo_sgd_cons`` (its
  ``decide`` picks among candidate steps with extra, non-private loss evaluations) and a recipe
  built with its own ``process_group`` (use ``make_private_zo(..., distributed=True)``).
  This path is the shell's public :meth:`~distopt.zo.ZOOptimizer.step_per_example` (the closure
  returns per-example losses; ``reduce`` maps the (batch, m) per-example scalars to the step's m
  scalars); the tests run it for every registered zeroth-order recipe.
- Any optimizer with ``closure_kind == "backward"`` (a distopt recipe or torch optimizer) can be
  the update rule of a self-contained two-point estimator (:class:`TwoPointEstimator`:
  ``perturb_(seed, scale)`` in place, ``per_example_scalars(closure, seed)``): the private
  direction ĝ·z is written to ``p.grad`` and ``optimizer.step()`` runs (ZO-SGD with ``sgd``,
  ZO-Lion with ``lion``, ...).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from distopt.privacy.accounting import ACCOUNTANTS, PrivacyState, check_delta, opacus, resolve_noise_multiplier
from distopt.privacy.engine import NotPrivatizable, _name, refusal


class TwoPointEstimator:
    """Seeded two-point (SPSA / MeZO-style) estimator of per-example projected gradients."""

    def __init__(self, params: list[Tensor], eps: float = 1e-3) -> None:
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"make_private_zo: invalid zo_eps={eps!r}; it must be a finite float > 0")
        self.params, self.eps = params, float(eps)

    def directions(self, seed: int) -> Iterator[Tensor]:
        """z for every parameter, from one generator per device seeded with ``seed``."""
        generators: dict[torch.device, torch.Generator] = {}
        for p in self.params:
            if p.device not in generators:
                generators[p.device] = torch.Generator(device=p.device).manual_seed(int(seed))
            yield torch.randn(p.shape, generator=generators[p.device], device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def perturb_(self, seed: int, scale: float) -> None:
        for p, z in zip(self.params, self.directions(seed)):
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def per_example_scalars(self, closure: Callable[[], Tensor], seed: int) -> tuple[Tensor, Tensor]:
        """``((ℓ(θ+εz) - ℓ(θ-εz)) / 2ε, mean loss)``. θ is restored exactly from a copy
        (fl(fl(θ+εz) - 2εz) + εz is not θ); this path writes ``p.grad`` anyway, so the copy costs
        no more than the gradient it is about to hold."""
        backup = [p.detach().clone() for p in self.params]
        eps = self.eps
        try:
            self.perturb_(seed, eps)
            plus = _per_example(closure())
            self.perturb_(seed, -2.0 * eps)
            minus = _per_example(closure())
        finally:
            for p, b in zip(self.params, backup):
                p.copy_(b)
        if plus.shape != minus.shape:
            raise ValueError("make_private_zo: the closure returned different shapes at θ+εz and θ-εz")
        return (plus - minus) / (2.0 * eps), 0.5 * (plus.mean() + minus.mean()) if plus.numel() else plus.sum()


def _per_example(losses: Any) -> Tensor:
    if not isinstance(losses, Tensor) or losses.ndim != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"DP-ZO: the closure must return per-example losses of shape (batch,), e.g. "
                         f"F.cross_entropy(model(x), y, reduction='none'); got {shape}")
    return losses.detach()


class DPZeroOrderOptimizer(torch.optim.Optimizer):
    """The private zeroth-order optimizer returned by :func:`make_private_zo`.

    ``step(closure)``: ``closure()`` returns the per-example losses of the current batch (no
    backward). Exposes ``param_groups``/``state`` of the wrapped optimizer (so LR schedulers
    work), ``privacy_spent()``, ``privacy``, ``private_scalars`` (the last step's private
    scalars) and ``state_dict()`` with the accountant under ``"privacy"`` and the seed counter of
    the two-point path under ``"zo"``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float,
                 expected_batch_size: float, privacy: PrivacyState, eps: float = 1e-3, seed: int = 0,
                 generator: torch.Generator | None = None, distributed: bool = False) -> None:
        # like Opacus' DPOptimizer: no Optimizer.__init__, the wrapped optimizer owns groups and state
        self.original_optimizer = optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.privacy, self.generator, self.distributed = privacy, generator, distributed
        self.base_seed, self.steps_taken = int(seed), 0
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self.estimator = TwoPointEstimator(params, eps)
        self.shell = getattr(type(optimizer), "closure_kind", "backward") == "forward"
        self.private_scalars: list[float] = []

    # the wrapped optimizer's groups and state (torch.optim.Optimizer attributes)
    param_groups = property(lambda self: self.original_optimizer.param_groups,
                            lambda self, v: setattr(self.original_optimizer, "param_groups", v))
    state = property(lambda self: self.original_optimizer.state,
                     lambda self, v: setattr(self.original_optimizer, "state", v))
    defaults = property(lambda self: self.original_optimizer.defaults,
                        lambda self, v: setattr(self.original_optimizer, "defaults", v))

    @property
    def projected_grad(self) -> float | None:
        """The last step's (first) private scalar ĝ."""
        return self.private_scalars[0] if self.private_scalars else None

    def privacy_spent(self, delta: float | None = None) -> tuple[float, float]:
        return self.privacy.spent(delta)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)

    def _seed(self) -> int:
        return (self.base_seed * 1_000_003 + self.steps_taken) % (2**63 - 1)

    def private_vector(self, per_example: Tensor) -> Tensor:
        """``(Σ_i clip(s_i) + N(0, σ²C² I)) / B`` for per-example scalar vectors ``s_i`` (rows of
        ``per_example``, shape (batch, m)); clip: to [-C, C] for m = 1, to L2 norm C otherwise.
        Distributed: the sums are all-reduced and the noise is drawn once, on rank 0."""
        c = self.max_grad_norm
        if per_example.shape[1] == 1:
            clipped = per_example.clamp(-c, c)
        else:
            norms = per_example.norm(dim=1, keepdim=True)
            clipped = per_example * (c / norms).clamp(max=1.0).nan_to_num(1.0)
        total = clipped.sum(0)
        world, rank = 1, 0
        if self.distributed:
            world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        std = self.noise_multiplier * c
        if rank == 0 and std > 0:
            device = self.generator.device if self.generator is not None else total.device
            noise = torch.normal(0.0, std, size=tuple(total.shape), generator=self.generator, device=device)
            total = total + noise.to(total.device, total.dtype)
        if world > 1:
            torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total / (self.expected_batch_size * world)

    def private_scalar(self, scalars: Tensor) -> Tensor:
        """:meth:`private_vector` for one scalar per example (shape (batch,))."""
        return self.private_vector(scalars.reshape(-1, 1))[0]

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError("DP-ZO: step(closure) needs a closure returning per-example losses (no backward)")
        self.privacy.check_next_step(self.noise_multiplier)
        if self.shell:
            loss = self.original_optimizer.step_per_example(lambda: _per_example(closure()), self._privatize)
        else:
            seed = self._seed()
            scalars, loss = self.estimator.per_example_scalars(closure, seed)
            g = self._privatize(scalars.reshape(-1, 1))[0]
            with torch.no_grad():
                for p, z in zip(self.estimator.params, self.estimator.directions(seed)):
                    p.grad = z.mul_(g)
            self.original_optimizer.step()
        self.steps_taken += 1
        return loss

    def _privatize(self, per_example: Tensor) -> list[float]:
        self.private_scalars = [float(v) for v in self.private_vector(per_example)]
        self.privacy.record(self.noise_multiplier)  # the mechanism ran: account for it
        return self.private_scalars

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.original_optimizer.state_dict())
        state["privacy"] = self.privacy.state_dict()
        state["zo"] = {"base_seed": self.base_seed, "steps_taken": self.steps_taken}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        privacy, zo = state.pop("privacy"), state.pop("zo")
        self.original_optimizer.load_state_dict(state)
        self.privacy.load_state_dict(privacy)
        self.base_seed, self.steps_taken = int(zo["base_seed"]), int(zo["steps_taken"])

    def __repr__(self) -> str:
        return f"DPZeroOrderOptimizer({self.original_optimizer!r}, σ={self.noise_multiplier:.4g}, C={self.max_grad_norm:g})"


def _zo_refusal(optimizer: Any) -> str | None:
    kind = getattr(type(optimizer), "closure_kind", "backward")
    if kind == "forward":
        from distopt.zo.optimizer import ZOOptimizer

        if not isinstance(optimizer, ZOOptimizer):
            return (f"{_name(optimizer)} is zeroth-order but not a distopt.zo.ZOOptimizer, so DP-ZO cannot reach its "
                    "scalars; pass a first-order update rule instead (e.g. distopt.create('sgd', ...) for ZO-SGD)")
        if type(optimizer).decide is not ZOOptimizer.decide:
            return (f"{_name(optimizer)} chooses among candidate steps with extra loss evaluations (decide), which "
                    "are not privatized; use zo_sgd (or another zeroth-order recipe) instead")
        if getattr(optimizer, "process_group", None) not in (None, False):
            return (f"{_name(optimizer)} was built with process_group= (it would average non-private scalars); "
                    "build it without and call make_private_zo(..., distributed=True)")
        return None
    reason = refusal(optimizer)
    if reason and "zeroth-order" not in reason:
        return reason
    return None


def make_private_zo(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float = 1e-5,
    epochs: float | None = None,
    max_grad_norm: float,
    accountant: str = "prv",
    poisson_sampling: bool = True,
    budget: float | None = None,
    zo_eps: float = 1e-3,
    seed: int = 0,
    noise_generator: torch.Generator | None = None,
    distributed: bool = False,
) -> tuple[nn.Module, DPZeroOrderOptimizer, torch.utils.data.DataLoader]:
    """DP-ZO around ``optimizer``; returns ``(module, private_optimizer, data_loader)``.

    ``max_grad_norm`` is C, the clipping bound of each per-example scalar (of the L2 norm of each
    example's scalar vector for recipes with several). ``zo_eps`` and ``seed`` are those of the
    two-point path; a ``distopt.zo`` recipe uses its own ``eps`` and ``seed``. Noise: exactly one of
    ``noise_multiplier`` or ``target_epsilon`` + ``epochs``, as in :func:`make_private`. The
    data loader is switched to Poisson sampling by Opacus' ``DPDataLoader`` (unless
    ``poisson_sampling=False``). With ``distributed=True`` (torch.distributed initialised, the
    same ``seed`` on every rank) only the summed scalar is all-reduced and noise is drawn once,
    on rank 0. Training loop::

        for x, y in data_loader:
            optimizer.step(lambda: F.cross_entropy(module(x), y, reduction="none"))
    """
    opacus()
    from opacus.data_loader import DPDataLoader

    if accountant not in ACCOUNTANTS:
        raise ValueError(f"make_private_zo: invalid accountant={accountant!r}; it must be one of {', '.join(ACCOUNTANTS)}")
    if not (isinstance(max_grad_norm, (int, float)) and math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"make_private_zo: invalid max_grad_norm={max_grad_norm!r}; it must be a finite float > 0")
    target_delta = check_delta(target_delta)
    reason = _zo_refusal(optimizer)
    if reason:
        raise NotPrivatizable(f"make_private_zo: {reason}")
    model_params = {id(p) for p in module.parameters()}
    if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
        raise ValueError("make_private_zo: the optimizer's parameters are not all parameters of the module")
    if len(data_loader) == 0:
        raise ValueError("make_private_zo: the data loader is empty")
    if poisson_sampling:
        data_loader = DPDataLoader.from_data_loader(data_loader, distributed=distributed)
    sample_rate = 1.0 / len(data_loader)
    expected_batch_size = int(len(data_loader.dataset) * sample_rate)  # Opacus' own definition
    if distributed:
        expected_batch_size /= torch.distributed.get_world_size()
    sigma = resolve_noise_multiplier(noise_multiplier, target_epsilon, target_delta, epochs, sample_rate, accountant,
                                     caller="make_private_zo")
    from opacus.accountants import create_accountant

    privacy = PrivacyState(create_accountant(accountant), sample_rate=sample_rate, target_delta=target_delta,
                           budget=budget, noise_multiplier=sigma, max_grad_norm=max_grad_norm, generator=noise_generator)
    private = DPZeroOrderOptimizer(optimizer, noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                                   expected_batch_size=expected_batch_size, privacy=privacy, eps=zo_eps, seed=seed,
                                   generator=noise_generator, distributed=distributed)
    return module, private, data_loader


__all__ = ["DPZeroOrderOptimizer", "TwoPointEstimator", "make_private_zo"]
