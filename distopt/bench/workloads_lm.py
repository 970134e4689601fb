"""Language-model workloads: a LLaMA-style decoder in plain torch, on text that ships with Python.

Model (Touvron et al., "LLaMA", 2023): token embedding; ``depth`` pre-norm blocks of RMSNorm ->
causal multi-head attention with rotary position embeddings (RoPE, Su et al. 2021) -> residual,
RMSNorm -> SwiGLU MLP (Shazeer 2020) -> residual; final RMSNorm; untied linear head. No biases.

Workloads:

- ``llama_char`` (CPU: 2 layers, width 64, context 64, batch 8, 120 steps; CUDA: 6 layers, width 384,
  context 256, batch 64, 2000 steps): a character (byte) LM, vocabulary 128 (ASCII; other bytes become ``?``),
  on a deterministic corpus: a fixed list of Python standard-library modules, read in that order,
  concatenated, first 600 kB; every 20th block of 4096 characters is validation, the next one test. The corpus hash goes
  into every record (different Python versions ship slightly different sources). If the
  standard-library sources are missing, the docstrings of the same modules are used instead.
- ``llama_60m``: the LLaMA-60M configuration of the GaLore/survey experiments (hidden 512,
  intermediate 1376, 8 heads, 8 layers, vocabulary 32000, context 256) for GPUs. Without
  ``--data`` it trains on the same offline corpus at byte level (token ids < 256 of the
  32000-entry vocabulary: the compute and memory profile of LLaMA-60M, not its quality numbers).
- ``llama_60m_wikitext``: LLaMA-60M on a user-supplied token file, ``--data PATH``: a ``.npy``
  or raw ``.bin`` (uint16) array of token ids (e.g. wikitext-103 tokenized with the LLaMA
  tokenizer), or a ``.txt`` file read as bytes. A missing path raises a clear error.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import importlib
import math
import os
import sysconfig
from typing import Any

import torch
from torch import Tensor, nn

from distopt.bench.workloads import LanguageModelWorkload, Workload

CORPUS_MODULES = (
    "textwrap", "string", "argparse", "functools", "collections/__init__", "heapq", "bisect", "calendar",
    "difflib", "shlex", "pprint", "dataclasses", "contextlib", "enum", "fractions", "statistics", "random",
    "csv", "json/decoder", "json/encoder", "gettext", "locale", "ipaddress", "pathlib", "tempfile", "shutil",
)
"""Standard-library modules of the character corpus, in this order (present in Python >= 3.10)."""


# ------------------------------------------------------------------------------------------- corpus


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_chars: int = 600_000) -> tuple[str, dict[str, Any]]:
    """(text, info): the modules of :data:`CORPUS_MODULES` concatenated, cut at ``max_chars``."""
    root = sysconfig.get_paths()["stdlib"]
    parts, used, source = [], [], "stdlib sources"
    for mod in CORPUS_MODULES:
        path = os.path.join(root, mod + ".py")
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                parts.append(fh.read())
            used.append(mod)
    if not parts:  # stripped Python install: fall back to the docstrings of the same modules
        source = "stdlib docstrings"
        for mod in CORPUS_MODULES:
            try:
                m = importlib.import_module(mod.replace("/__init__", "").replace("/", "."))
            except ImportError:
                continue
            docs = [inspect.getdoc(m) or ""] + [inspect.getdoc(v) or "" for _, v in sorted(vars(m).items())
                                                if callable(v) and getattr(v, "__module__", None) == m.__name__]
            parts.append("\n\n".join(d for d in docs if d))
            used.append(mod)
    text = "\n\n".join(parts)[:max_chars]
    info = {"source": source, "modules": len(used), "chars": len(text),
            "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]}
    return text, info


def byte_tokens(text: str | bytes, vocab: int = 128) -> Tensor:
    """UTF-8 bytes as token ids; bytes >= ``vocab`` become ``?`` (63)."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    return torch.where(ids >= vocab, torch.full_like(ids, 63), ids)


def split_tokens(ids: Tensor, val: float = 0.05, test: float = 0.05, block: int = 4096) -> dict[str, Tensor]:
    """Interleaved split: the stream is cut in blocks of ``block`` tokens and every ``1/val``-th block
    (and the one after it, for ``test``) is held out, so the three splits cover the same files."""
    period = max(2, round(1 / max(val, test)))
    block = max(1, min(block, len(ids) // period))
    n_blocks = max(1, len(ids) // block)
    chunks = list(torch.split(ids[: n_blocks * block], block))
    pick = lambda r: torch.cat([c for i, c in enumerate(chunks) if i % period == r])  # noqa: E731
    train = torch.cat([c for i, c in enumerate(chunks) if i % period not in (period - 2, period - 1)])
    return {"train": train, "val": pick(period - 2), "test": pick(period - 1)}


def load_token_file(path: str) -> Tensor:
    """Token ids from ``.npy`` / ``.bin`` (uint16) / ``.txt`` (bytes) at ``path``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r} does not exist; give a .npy or .bin (uint16 token ids) or .txt file")
    if path.endswith(".npy"):
        import numpy as np

        return torch.as_tensor(np.load(path, mmap_mode="r").astype("int64"))
    if path.endswith(".bin"):
        import numpy as np

        return torch.as_tensor(np.fromfile(path, dtype=np.uint16).astype("int64"))
    with open(path, "rb") as fh:
        return byte_tokens(fh.read(), vocab=256)


# -------------------------------------------------------------------------------------------- model


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + ε) · g (Zhang & Sennrich, 2019)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, context: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin tables, shape (context, head_dim // 2)."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i + d/2]) of the last dim by the position's angle θ_i·pos, the
    "rotate-half" layout of GPT-NeoX and Hugging Face's LLaMA (the same rotation as the paper's
    interleaved pairs up to a fixed permutation of head dimensions). x: (b, h, n, d)."""
    n = x.shape[-2]
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[:n].to(x.dtype), sin[:n].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, context: int) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        cos, sin = rope_tables(dim // heads, context)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        shape = (b, n, self.heads, d // self.heads)
        q, k, v = (w(x).view(shape).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rope(q, self.cos, self.sin), apply_rope(k, self.cos, self.sin)
        out = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, context: int) -> None:
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, context)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """A LLaMA-style decoder (see the module docstring); ``embed`` and ``head`` are named so."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, hidden: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(LlamaBlock(dim, heads, hidden, context) for _ in range(depth))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        std = 0.02
        for name, p in self.named_parameters():
            if p.ndim == 2:
                scaled = name.endswith("wo.weight") or name.endswith("w2.weight")
                nn.init.normal_(p, std=std / math.sqrt(2 * depth) if scaled else std)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------------------------------- factories


def _corpus_tokens(vocab: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    text, info = stdlib_corpus()
    return split_tokens(byte_tokens(text, vocab)), info


def llama_char(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    cuda = device.startswith("cuda")
    cfg = ({"dim": 384, "depth": 6, "heads": 6, "hidden": 1024, "context": 256} if cuda
           else {"dim": 64, "depth": 2, "heads": 4, "hidden": 172, "context": 64})
    _, info = _corpus_tokens(128)
    return LanguageModelWorkload(
        "llama_char", lambda: _corpus_tokens(128)[0], lambda seed: Llama(128, **cfg), proxy="LLaMA (char LM)",
        vocab_size=128, context=cfg["context"], budget=40 if quick else (2000 if cuda else 120),
        batch_size=64 if cuda else 8, eval_every=10 if quick else (100 if cuda else 12),
        eval_windows=256 if cuda else 32, device=device, model_config=cfg, corpus=info)


LLAMA_60M = {"dim": 512, "depth": 8, "heads": 8, "hidden": 1376, "context": 256}


def llama_60m(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    if data:
        return llama_60m_wikitext(device, quick, data)
    _, info = _corpus_tokens(256)
    return LanguageModelWorkload(
        "llama_60m", lambda: _corpus_tokens(256)[0], lambda seed: Llama(32000, **LLAMA_60M),
        proxy="LLaMA-60M", vocab_size=32000, context=LLAMA_60M["context"], budget=20 if quick else 2000,
        batch_size=64, eval_every=10 if quick else 100, eval_windows=256, device=device,
        model_config={**LLAMA_60M, "vocab": 32000}, corpus=info)


def llama_60m_wikitext(device: str = "cpu", quick: bool = False, data: str | None = None) -> Workload:
    if not data:
        raise ValueError("workload 'llama_60m_wikitext' needs --data PATH: a .npy/.bin (uint16) file of LLaMA "
                         "token ids, e.g. wikitext-103 tokenized offline (no download is attempted)")
    ids = load_token_file(data)
    if len(ids) < 100 * (LLAMA_60M["context"] + 1):
        raise ValueError(f"--data {data!r} holds {len(ids)} tokens; llama_60m_wikitext needs at least "
                         f"{100 * (LLAMA_60M['context'] + 1)} (1 % validation and test splits of one context each)")
    vocab = max(32000, int(ids.max()) + 1)
    info = {"source": os.path.abspath(data), "tokens": len(ids)}
    return LanguageModelWorkload(
        "llama_60m_wikitext", lambda: split_tokens(ids, 0.01, 0.01), lambda seed: Llama(vocab, **LLAMA_60M),
        proxy="LLaMA-60M / wikitext", vocab_size=vocab, context=LLAMA_60M["context"],
        budget=20 if quick else 10_000, batch_size=64, eval_every=10 if quick else 500, eval_windows=512,
        device=device, model_config={**LLAMA_60M, "vocab": vocab}, corpus=info)


FACTORIES = {"llama_char": llama_char, "llama_60m": llama_60m, "llama_60m_wikitext": llama_60m_wikitext}
