"""Hugging Face ``transformers.Trainer`` with any distopt recipe, by the closure its step needs
(``closure_kind``):

- ``"backward"`` (AdamW, Muon, Shampoo, ...): the plain ``Trainer`` with
  ``optimizers=(distopt.create(name, model.parameters(), ...), None)``; checkpoints go through the
  recipe's ``state_dict`` (tests/integrations/test_hf_trainer.py: bitwise resume, equal to the
  plain loop);
- ``"create_graph"`` (AdaHessian, Sophia: a Hessian-vector product of the gradient at each step):
  :class:`CurvatureTrainer`, whose backward keeps the graph (``create_graph=True``); the
  Trainer's ``model.zero_grad()`` after each step sets the gradients to None, which frees it;
- ``"forward"`` (the zeroth-order recipes): :class:`distopt.zo.hf.ZOTrainer`.

The attention must be twice differentiable: torch's fused SDPA kernels (flash, memory-efficient;
transformers' default ``attn_implementation="sdpa"``) have no double backward, so
:class:`CurvatureTrainer` refuses such a model up front and names the fix (``"eager"``).

Gradient clipping (``max_grad_norm``) scales the gradient in place; the Hessian-vector product is
still that of the unclipped loss, which is what AdaHessian and Sophia estimate (curvature), so
clipping stays available.
"""
from __future__ import annotations

from typing import Any

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError('distopt.integrations.hf needs transformers: pip install "distopt[hf]"') from exc

from distopt.zo.hf import ZOTrainer


class CurvatureTrainer(Trainer):
    """A ``Trainer`` whose backward is ``backward(create_graph=True)``, for recipes with
    ``closure_kind == "create_graph"`` (``optimizers=(distopt.create("sophia", ...), None)``)."""

    def __init__(self, model: Any = None, *args: Any, **kwargs: Any) -> None:
        attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if attention not in (None, "eager"):
            raise ValueError(f"CurvatureTrainer: the model's attn_implementation={attention!r} has no double backward "
                             "(a Hessian-vector product needs one); load or build it with attn_implementation='eager' "
                             "(or call model.set_attn_implementation('eager'))")
        super().__init__(model, *args, **kwargs)

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any = None) -> Any:
        accelerator, own = self.accelerator, "backward" in vars(self.accelerator)
        backward = accelerator.backward
        accelerator.backward = lambda loss, **kw: backward(loss, create_graph=True, **kw)  # type: ignore
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if own:
                accelerator.backward = backward  # type: ignore
            else:
                del accelerator.backward  # the class's method again


__all__ = ["CurvatureTrainer", "ZOTrainer"]
