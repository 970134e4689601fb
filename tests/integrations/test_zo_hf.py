"""ZOTrainer: a transformers.Trainer whose steps are zeroth-order (forward passes only)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")


class Repeats(torch.utils.data.Dataset):
    """Sequences of a short repeating pattern: learnable, so a falling loss means learning."""

    def __init__(self, vocab: int, length: int = 24, count: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(count):
            period = int(torch.randint(2, 5, (1,), generator=g))
            pattern = torch.randint(0, vocab, (period,), generator=g)
            self.items.append(pattern.repeat(length // period + 1)[:length])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.items[i], "labels": self.items[i]}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_zo_trainer_lowers_the_loss_without_backward(tmp_path: Path) -> None:
    from distopt.zo.hf import ZOTrainer

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    # partial fine-tuning (the head, the last norm and MLP): frozen weights must stay untouched
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("lm_head", "model.norm")) or "layers.1.mlp" in name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    data = Repeats(64)
    probe = {k: torch.stack([data[i][k] for i in range(16)]) for k in ("input_ids", "labels")}

    def eval_loss() -> float:
        with torch.no_grad():
            return model(**probe).loss.item()

    before = eval_loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=16, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=10, report_to=[], save_strategy="no",
        use_cpu=True, dataloader_num_workers=0, seed=0)
    backward_calls = []
    trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo_optimizer="zo_sgd",
                        zo_kwargs={"eps": 1e-3, "n": 2, "record": True})
    original = torch.Tensor.backward
    torch.Tensor.backward = lambda *a, **k: backward_calls.append(1)  # type: ignore[method-assign]
    try:
        trainer.train()
    finally:
        torch.Tensor.backward = original  # type: ignore[method-assign]
    after = eval_loss()
    assert not backward_calls
    assert all(p.grad is None for p in model.parameters())
    assert len(trainer.zo_optimizer.log.steps) == 30
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert after < before - 0.03, (before, after)          # 4.18 -> 4.11 when this was written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_zo_trainer_half_precision_weights(tmp_path: Path, dtype: torch.dtype) -> None:
    """bf16/fp16 weights: perturbed and restored in the weight dtype (bit-identical at lr = 0), updated
    in place in that dtype at lr > 0, with the logged scalars float64 Python numbers."""
    from distopt.zo.hf import ZOTrainer

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    data = Repeats(64, count=24)
    moved = {}
    for lr in (0.0, 1e-2):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(dtype)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(lr)), max_steps=4, per_device_train_batch_size=8, learning_rate=lr,
            lr_scheduler_type="constant", weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=True,
            dataloader_num_workers=0, seed=0, logging_steps=100)
        trainer = ZOTrainer(model=model, args=args, train_dataset=data, zo_optimizer="zo_sgd",
                            zo_kwargs={"eps": 1e-2, "record": True})
        trainer.train()
        assert all(p.dtype == dtype for p in model.parameters())
        steps = trainer.zo_optimizer.log.steps
        assert len(steps) == 4 and all(isinstance(s, float) and s == s for r in steps for s in r.scalars)
        assert any(r.scalars[0] != 0.0 for r in steps)        # the probes saw a loss difference
        moved[lr] = sum(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    assert moved[0.0] == 0                                     # perturb + restore is exact in the weight dtype
    assert moved[1e-2] == len(start)                           # every tensor took the update
