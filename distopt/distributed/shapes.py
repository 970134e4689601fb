"""Parameter shape lists of real models, for planning and benchmarks without building them.

``gpt2_small_shapes()``: Hugging Face GPT-2 small (124,439,808 params; Conv1D weights stored
(in, out); lm_head tied to wte). ``llama_1b_shapes()``: Llama 3.2 1B (1,235,814,400 params:
16 layers, hidden 2048, MLP 8192, 32 query / 8 key-value heads of 64, vocab 128256, tied
embeddings). ``embedding_names`` picks the parameters that Muon users run with AdamW
(embeddings and output heads).
"""
from __future__ import annotations

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2_small_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, context: int = 1024) -> Shapes:
    out: Shapes = [("transformer.wte.weight", (vocab, d)), ("transformer.wpe.weight", (context, d))]
    for i in range(layers):
        h = f"transformer.h.{i}."
        out += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    out += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return out


def llama_1b_shapes(layers: int = 16, d: int = 2048, mlp: int = 8192, heads: int = 32, kv_heads: int = 8,
                    vocab: int = 128256) -> Shapes:
    head_dim = d // heads
    kv = kv_heads * head_dim
    out: Shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        h = f"model.layers.{i}."
        out += [
            (h + "self_attn.q_proj.weight", (d, d)), (h + "self_attn.k_proj.weight", (kv, d)),
            (h + "self_attn.v_proj.weight", (kv, d)), (h + "self_attn.o_proj.weight", (d, d)),
            (h + "mlp.gate_proj.weight", (mlp, d)), (h + "mlp.up_proj.weight", (mlp, d)),
            (h + "mlp.down_proj.weight", (d, mlp)),
            (h + "input_layernorm.weight", (d,)), (h + "post_attention_layernorm.weight", (d,)),
        ]
    out.append(("model.norm.weight", (d,)))
    return out


MODELS = {"gpt2-small": gpt2_small_shapes, "llama-1b": llama_1b_shapes}


def embedding_names(shapes: Shapes) -> set[str]:
    """Embeddings, position tables and output heads (Muon runs them with AdamW)."""
    keys = ("wte", "wpe", "embed", "lm_head", "output.weight")
    return {n for n, _ in shapes if any(k in n for k in keys)}
