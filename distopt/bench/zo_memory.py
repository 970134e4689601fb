"""Peak memory of a zeroth-order step next to inference and AdamW fine-tuning, same model and batch.

Models: LLaMA-architecture causal LMs (``transformers.LlamaForCausalLM`` from a ``LlamaConfig``,
random init, nothing downloaded) in three sizes; without transformers, pure-torch MLP language
models of similar parameter counts. Batch: random token ids (the memory does not depend on them).

Measured, per model:

- ``inference``: one forward pass computing the loss under ``torch.no_grad``;
- ``zo``: one step of a zeroth-order recipe (default ``zo_sgd``, MeZO) with the loss as closure
  (two forward passes at θ ± εz, the update), ``perturbation="on_use"`` and, for comparison,
  ``"in_place"`` (MeZO with an exact backup: one copy of the weights);
- ``adamw``: forward + backward + ``torch.optim.AdamW`` step (the state is created in that step
  and stays, so it is part of fine-tuning's steady-state footprint).

Peak memory = bytes of the model (parameters + buffers) + the peak of everything allocated during
the measured call. On CUDA that is ``torch.cuda.max_memory_allocated`` after a reset. On CPU, where
torch keeps no allocator statistics, it is counted exactly by :class:`distopt.zo.LiveBytes` (a
``TorchDispatchMode`` tracking live storage bytes): tracemalloc does not see torch's allocations
and RSS deltas are blurred by the allocator's caching; the counter is exact and portable. The ZO
generator's scratch buffers are freed before the step so they are counted too.

Communication per step in data-parallel training: DP-ZO all-reduces the recipe's scalars,
8·n bytes (float64) whatever the model; DDP AdamW all-reduces the fp32 gradient, 4 bytes per
parameter (the payload; a ring all-reduce moves about twice that per rank).
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

SIZES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2},
    "medium": {"vocab_size": 16384, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 6,
               "num_attention_heads": 8, "num_key_value_heads": 4},
}


@dataclass
class ZOMemoryRow:
    model: str
    arch: str
    params: int
    model_mb: float
    inference_mb: float
    zo_mb: float
    zo_in_place_mb: float
    adamw_mb: float
    zo_over_inference: float
    zo_in_place_over_inference: float
    adamw_over_inference: float
    dp_zo_bytes_per_step: int
    ddp_adamw_bytes_per_step: int


class _MLPLM(torch.nn.Module):
    """Fallback without transformers: embedding, residual MLP blocks, untied head, cross-entropy."""

    def __init__(self, vocab_size: int, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 **_: Any) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(hidden_size), torch.nn.Linear(hidden_size, intermediate_size),
                                torch.nn.GELU(), torch.nn.Linear(intermediate_size, hidden_size))
            for _ in range(num_hidden_layers))
        self.head = torch.nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> Any:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(h).float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


def build_model(size: str, device: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, str]:
    cfg = SIZES[size]
    torch.manual_seed(0)
    try:
        import transformers
    except ImportError:
        return _MLPLM(**cfg).to(device=device, dtype=dtype), "mlp-lm (transformers missing)"
    config = transformers.LlamaConfig(**cfg, max_position_embeddings=1024, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model, "LlamaForCausalLM"


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def measure_peak(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated while ``fn`` runs, over what was live before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from distopt.zo.memory import LiveBytes

    with LiveBytes() as mem:
        fn()
    return mem.peak


def bench_model(size: str, batch: int, seq: int, device: str, optimizer: str = "zo_sgd", n: int = 1,
                progress: Callable[[str], None] | None = None) -> ZOMemoryRow:
    import distopt
    from distopt.zo.perturb import clear_workspace

    say = progress or (lambda _s: None)
    model, arch = build_model(size, device)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    base = _model_bytes(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SIZES[size]["vocab_size"], (batch, seq), generator=g).to(device)

    def loss() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    say(f"{size}: inference")
    with torch.no_grad():
        loss()                                          # warm-up (lazy buffers, kernels)

        def infer() -> None:
            loss()

        inference = measure_peak(infer, device)
    peaks = {}
    for mode in ("on_use", "in_place"):
        say(f"{size}: {optimizer} step ({mode})")
        opt = distopt.create(optimizer, model.parameters(), lr=1e-6, n=n, perturbation=mode)
        clear_workspace()
        peaks[mode] = measure_peak(lambda opt=opt: opt.step(loss), device)
    say(f"{size}: AdamW fine-tuning step")
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step() -> None:
        adamw.zero_grad(set_to_none=True)
        out = loss()
        out.backward()
        adamw.step()

    model.train()
    adam_peak = measure_peak(train_step, device)
    adamw.zero_grad(set_to_none=True)
    mb = lambda b: round((base + b) / 2**20, 2)  # noqa: E731
    inf_total = base + inference
    return ZOMemoryRow(
        model=size, arch=arch, params=params, model_mb=round(base / 2**20, 2), inference_mb=mb(inference),
        zo_mb=mb(peaks["on_use"]), zo_in_place_mb=mb(peaks["in_place"]), adamw_mb=mb(adam_peak),
        zo_over_inference=round((base + peaks["on_use"]) / inf_total, 3),
        zo_in_place_over_inference=round((base + peaks["in_place"]) / inf_total, 3),
        adamw_over_inference=round((base + adam_peak) / inf_total, 3),
        dp_zo_bytes_per_step=8 * n * (2 if optimizer == "hizoo" else 1),
        ddp_adamw_bytes_per_step=4 * params,
    )


def bench_zo_memory(sizes: list[str], batch: int, seq: int, device: str, optimizer: str = "zo_sgd", n: int = 1,
                    progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    return [asdict(bench_model(s, batch, seq, device, optimizer, n, progress)) for s in sizes]


__all__ = ["SIZES", "ZOMemoryRow", "bench_model", "bench_zo_memory", "build_model", "measure_peak"]
