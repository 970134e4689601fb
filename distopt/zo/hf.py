"""Hugging Face ``transformers`` integration: :class:`ZOTrainer`, a ``Trainer`` that fine-tunes with
forward passes only.

    from distopt.zo.hf import ZOTrainer
    trainer = ZOTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-6),
                        train_dataset=ds, zo_optimizer="zo_sgd", zo_kwargs={"eps": 1e-3})
    trainer.train()

``training_step`` runs one zeroth-order step of the chosen recipe with the model's loss
(``compute_loss``) as the closure, under ``torch.no_grad`` and with the model in eval mode
(dropout off, as MeZO does, so the probes at θ ± εz see the same function); there is no
``backward``. The optimizer the Trainer holds is a proxy sharing the recipe's ``param_groups``
(the Trainer's LR scheduler drives the recipe's lr) whose ``step()`` does nothing: the step has
already happened inside ``training_step``. Under ``torchrun`` with several processes the recipe
averages its scalars over the default process group (8·n bytes a step, no gradient all-reduce: the
Trainer's DDP wrapper only runs forwards under ``no_grad``); each rank evaluates its shard of the
global batch, so the trajectory is that of one process on the union (tests/distributed/
test_zo_data_parallel.py: 2 CPU ranks, float64, 1e-12, with ``train_sampling_strategy="sequential"``
so the reference sees the same batches).
Weights stay in their dtype (bf16/fp16 perturbations are rounded in the weight dtype); the
losses and scalars are float64 Python numbers. Gradient accumulation is refused (a ZO step per
micro-batch is the ZO analogue; set ``gradient_accumulation_steps=1``); DeepSpeed / FSDP through
the Trainer are not wired here (use the recipes directly, ``model=`` for FSDP2).
"""
from __future__ import annotations

from typing import Any

import torch

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('distopt.zo.hf needs transformers: pip install "distopt[hf]"') from exc

import distopt


class ZOStepProxy(torch.optim.Optimizer):
    """The optimizer object the Trainer (and accelerate, and the LR scheduler) sees: it shares the
    zeroth-order optimizer's ``param_groups`` and ``state``; ``step()`` is a no-op."""

    def __init__(self, zo: torch.optim.Optimizer) -> None:
        super().__init__([p for g in zo.param_groups for p in g["params"]], dict(zo.defaults))
        self.zo = zo
        self.param_groups = zo.param_groups
        self.state = zo.state

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.zo.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose training step is a zeroth-order step (no backward).

    Extra arguments: ``zo_optimizer`` (a distopt zeroth-order recipe name, default ``"zo_sgd"``) and
    ``zo_kwargs`` (its hyperparameters besides ``lr`` and ``weight_decay``, which come from
    ``TrainingArguments``; e.g. ``{"eps": 1e-3, "n": 1}``, ``record=True`` for a replay log)."""

    def __init__(self, *args: Any, zo_optimizer: str = "zo_sgd", zo_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if distopt.get(zo_optimizer).closure_kind != "forward":
            raise ValueError(f"ZOTrainer: {zo_optimizer!r} is not a zeroth-order recipe; "
                             f"choose one of {distopt.available('zeroth_order')}")
        self.zo_name = zo_optimizer
        self.zo_kwargs = dict(zo_kwargs or {})
        self.zo_optimizer: Any = None
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("ZOTrainer: gradient_accumulation_steps must be 1 (each micro-batch is one ZO step)")

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            model = model if model is not None else self.model
            params = [p for p in model.parameters() if p.requires_grad]
            kwargs = dict(self.zo_kwargs)
            if self.args.world_size > 1 and torch.distributed.is_initialized():
                kwargs.setdefault("process_group", True)
            self.zo_optimizer = distopt.create(self.zo_name, params, lr=self.args.learning_rate,
                                               weight_decay=self.args.weight_decay, **kwargs)
            self.optimizer = ZOStepProxy(self.zo_optimizer)
        return self.optimizer

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        if self.zo_optimizer is None:
            self.create_optimizer()
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch).detach()

        try:
            loss = self.zo_optimizer.step(closure)
        finally:
            model.train(was_training)
        return loss.to(device=self.args.device, dtype=torch.float32)


__all__ = ["ZOStepProxy", "ZOTrainer"]
