"""The zeroth-order example task: a small LLaMA-architecture causal LM on generated arithmetic text.

Shared by ``examples/zo_finetune_llm.py`` and ``distopt bench zo --convergence``
(:mod:`distopt.bench.zo_convergence`). Nothing is downloaded:

- text: ``"a plus b is c."`` statements (:func:`generated_text`), learnable structure (digits,
  carries, fixed words); the first :data:`TRAIN_COUNT` of :data:`TEXT_COUNT` are the training set,
  the rest are held out (:func:`datasets`);
- tokens: one id per character (:class:`CharTokenizer`, 0 is padding, labels -100 at padding);
- model: ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` with random init
  (:func:`llama_from_config`), ``intermediate_size = 2 · hidden``, 4 heads, 2 key-value heads.

Only this module's model builder needs transformers (imported on call).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_COUNT = 4096
TRAIN_COUNT = 3584
EVAL_EXAMPLES = 256
Encode = Callable[[str, int], list[int]]


def generated_text(count: int, seed: int) -> list[str]:
    """Short arithmetic statements: learnable structure (digits, carries, fixed words)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(f"{a} plus {b} is {a + b}.")
    return out


class CharTokenizer:
    """Characters of the generated text -> ids (0 is padding)."""

    def __init__(self, texts: list[str]) -> None:
        self.vocab = ["<pad>"] + sorted(set("".join(texts)))
        self.index = {c: i for i, c in enumerate(self.vocab)}

    def encode(self, text: str, length: int) -> list[int]:
        ids = [self.index[c] for c in text][:length]
        return ids + [0] * (length - len(ids))


class TextDataset(torch.utils.data.Dataset):
    """Fixed-length rows: ``input_ids``, ``attention_mask`` (ids != 0), ``labels`` (-100 at padding)."""

    def __init__(self, texts: list[str], encode: Encode, length: int) -> None:
        self.rows = [torch.tensor(encode(t, length)) for t in texts]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.rows[i]
        labels = ids.clone()
        labels[ids == 0] = -100
        return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def datasets(texts: list[str], encode: Encode, length: int) -> tuple[TextDataset, TextDataset]:
    """(train, held-out): the first :data:`TRAIN_COUNT` texts and the rest."""
    return TextDataset(texts[:TRAIN_COUNT], encode, length), TextDataset(texts[TRAIN_COUNT:], encode, length)


def stack(dataset: TextDataset, indices: list[int] | range, device: str | torch.device = "cpu"
          ) -> dict[str, torch.Tensor]:
    """A batch (dict of stacked tensors) of ``dataset[i]`` for ``i`` in ``indices``, on ``device``."""
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]).to(device) for k in ("input_ids", "attention_mask", "labels")}


def eval_batch(held_out: TextDataset, device: str | torch.device = "cpu", count: int = EVAL_EXAMPLES
               ) -> dict[str, torch.Tensor]:
    """The held-out evaluation batch: its first ``count`` rows (fewer if it is shorter)."""
    return stack(held_out, range(min(count, len(held_out))), device)


def llama_from_config(vocab_size: int, hidden: int, layers: int, seed: int,
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``LlamaForCausalLM`` from a config, random init seeded by ``seed`` (``torch.manual_seed``)."""
    import transformers

    if hidden % 4:
        raise ValueError(f"hidden must be a multiple of 4 (4 attention heads), got {hidden}")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).to(dtype)


def build_task(hidden: int = 64, layers: int = 2, length: int = 24, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, TextDataset, TextDataset]:
    """The example's default task: (model from a config, train set, held-out set), all from ``seed``."""
    texts = generated_text(TEXT_COUNT, seed)
    tok = CharTokenizer(texts)
    model = llama_from_config(len(tok.vocab), hidden, layers, seed, dtype)
    train, held_out = datasets(texts, tok.encode, length)
    return model, train, held_out


__all__ = ["CharTokenizer", "DTYPES", "EVAL_EXAMPLES", "TEXT_COUNT", "TRAIN_COUNT", "TextDataset", "build_task",
           "datasets", "eval_batch", "generated_text", "llama_from_config", "stack"]
