"""distopt recipes dropped into a ``transformers.Trainer`` (``optimizers=(opt, None)``), on a LLaMA
built from a config (random init, no download):

- every gradient recipe of the registry trains and resumes from a Trainer checkpoint
  (``optimizer.pt`` written from ``state_dict()``, read back with ``load_state_dict``) bitwise
  equal to the uninterrupted run;
- the Trainer's steps are the plain loop's (same batches, same optimizer), bitwise;
- the curvature recipes (``closure_kind == "create_graph"``: a Hessian-vector product of the
  gradient) do the same in ``distopt.integrations.hf.CurvatureTrainer``, equal to the plain loop
  with ``backward(create_graph=True)``;
- recipes the plain Trainer cannot drive (curvature, and the closure-evaluating zeroth-order ones,
  which have ``distopt.zo.hf.ZOTrainer``) stop at the first step, before any update, with an error
  that says what they need.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import distopt

transformers = pytest.importorskip("transformers")
from test_zo_hf import Repeats  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TRAINED = [n for n in distopt.available() if distopt.get(n).closure_kind in ("backward", "create_graph")]
OTHER_RECIPES = [n for n in distopt.available() if distopt.get(n).closure_kind != "backward"]
STEPS, SAVE_AT, BATCH = 6, 3, 8


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation="eager")  # SDPA's fused kernels: no double backward
    return transformers.LlamaForCausalLM(config)


def _trainer(model: torch.nn.Module, opt: Any, out: Path, save: bool, plain: bool = False) -> transformers.Trainer:
    """The Trainer class for ``opt``'s closure kind (``plain``: transformers.Trainer whatever it is)."""
    from distopt.integrations.hf import CurvatureTrainer

    curvature = type(opt).closure_kind == "create_graph" and not plain
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, lr_scheduler_type="constant",
        max_grad_norm=0.0, report_to=[], save_strategy="steps" if save else "no", save_steps=SAVE_AT, use_cpu=True,
        dataloader_num_workers=0, seed=0, logging_steps=100, disable_tqdm=True, train_sampling_strategy="sequential")
    cls = CurvatureTrainer if curvature else transformers.Trainer
    return cls(model=model, args=args, train_dataset=Repeats(64), optimizers=(opt, None))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(name: str, out: Path, save: bool = False, resume: Path | None = None) -> torch.Tensor:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(model, distopt.create(name, model.parameters(), lr=1e-3), out, save).train(
            resume_from_checkpoint=str(resume) if resume else None)
    return _flat(model)


@pytest.mark.parametrize("name", TRAINED)
def test_trainer_resumes_bitwise(name: str, tmp_path: Path) -> None:
    whole = _train(name, tmp_path / "whole", save=True)
    assert (whole - _flat(_model())).abs().max() > 0, f"{name} did not train"
    resumed = _train(name, tmp_path / "resumed", resume=tmp_path / "whole" / f"checkpoint-{SAVE_AT}")
    assert torch.equal(resumed, whole), f"{name}: resumed run differs by {(resumed - whole).abs().max():.3g}"


@pytest.mark.parametrize("name", ["adamw", "muon", "shampoo", "sophia", "adahessian"])
def test_trainer_steps_are_the_plain_loop(name: str, tmp_path: Path) -> None:
    trained = _train(name, tmp_path)
    model, data = _model(), Repeats(64)
    opt = distopt.create(name, model.parameters(), lr=1e-3)
    for step in range(STEPS):  # sequential sampling: batch k is items [8k, 8k + 8)
        batch = {k: torch.stack([data[i][k] for i in range(step * BATCH, (step + 1) * BATCH)])
                 for k in ("input_ids", "labels")}
        model(**batch).loss.backward(create_graph=opt.closure_kind == "create_graph")
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert torch.equal(trained, _flat(model)), (trained - _flat(model)).abs().max()


@pytest.mark.parametrize("name", OTHER_RECIPES)
def test_trainer_refuses_recipes_it_cannot_drive(name: str, tmp_path: Path) -> None:
    kind = distopt.get(name).closure_kind
    hint = "CurvatureTrainer" if kind == "create_graph" else "needs a closure that returns the loss"
    model = _model()
    before = _flat(model)
    with pytest.raises(RuntimeError, match=hint):
        _trainer(model, distopt.create(name, model.parameters(), lr=1e-3), tmp_path, save=False, plain=True).train()
    assert torch.equal(_flat(model), before)  # refused before any update


def test_curvature_trainer_refuses_fused_attention(tmp_path: Path) -> None:
    from distopt.integrations.hf import CurvatureTrainer

    model = _model()
    model.set_attn_implementation("sdpa")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        CurvatureTrainer(model=model, args=args, optimizers=(distopt.create("sophia", model.parameters()), None))
