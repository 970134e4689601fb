"""Zeroth-order fine-tuning of a causal language model: forward passes only (MeZO and friends).

CPU, a few minutes (LLaMA-architecture model built from a config, random init, generated text,
character-level tokens; nothing is downloaded):

    python examples/zo_finetune_llm.py --steps 300

GPU with a local Hugging Face model directory (its tokenizer is used), bf16 weights:

    python examples/zo_finetune_llm.py --model /path/to/llama --dtype bf16 --lr 1e-6 --eps 1e-3 --steps 1000

Data-parallel (each rank its own batches; only the n scalars are all-reduced, 8·n bytes a step):

    torchrun --nproc_per_node 2 examples/zo_finetune_llm.py --steps 100

The step is ``distopt.zo.hf.ZOTrainer`` (a transformers ``Trainer``) driving any zeroth-order recipe
(``--optimizer zo_sgd | zo_adam | hizoo | lozo | sparse_mezo | ...``). Weights stay in their dtype
(the perturbation θ ± εz is rounded in bf16/fp16 when the weights are); losses and scalars are
float64 numbers. ``--log PATH`` writes the seed-replay log (a few dozen bytes a step), from which
``distopt.zo.replay`` rebuilds the weights.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from distopt.zo.lm_task import (DTYPES, TEXT_COUNT, CharTokenizer, datasets, eval_batch, generated_text,
                                llama_from_config)


def build(args: argparse.Namespace, texts: list[str]):
    """(model, encode): a local Hugging Face model and its tokenizer, or the task's small LLaMA."""
    import transformers

    dtype = DTYPES[args.dtype]
    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token

        def encode(text: str, length: int) -> list[int]:
            ids = tok(text, truncation=True, max_length=length)["input_ids"]
            return ids + [tok.pad_token_id] * (length - len(ids))

        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        return model, encode
    tok = CharTokenizer(texts)
    return llama_from_config(len(tok.vocab), args.hidden, args.layers, args.seed, dtype), tok.encode


def main() -> None:
    import transformers

    from distopt.zo.hf import ZOTrainer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a local Hugging Face causal-LM directory (default: a small LLaMA from a config)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--optimizer", default="zo_sgd")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=24, help="tokens per example")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("-n", type=int, default=1, help="perturbations per step")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--log", help="write the seed-replay log (JSON) here")
    p.add_argument("--out", default="zo_finetune_out", help="Trainer output directory")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    texts = generated_text(TEXT_COUNT, args.seed)
    model, encode = build(args, texts)
    train, held_out = datasets(texts, encode, args.length)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)

    def eval_loss() -> float:
        batch = eval_batch(held_out, device)
        with torch.no_grad():
            return model(**batch).loss.float().item()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: {type(model).__name__}, {trainable / 1e6:.2f}M trainable params, {args.dtype}, {device}")
    before = eval_loss()
    targs = transformers.TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
        lr_scheduler_type="constant", weight_decay=0.0, logging_steps=max(1, args.steps // 10), report_to=[],
        save_strategy="no", use_cpu=device == "cpu", dataloader_num_workers=0, seed=args.seed,
        disable_tqdm=True)
    trainer = ZOTrainer(model=model, args=targs, train_dataset=train, zo_optimizer=args.optimizer,
                        zo_kwargs={"eps": args.eps, "n": args.n, "seed": args.seed, "record": bool(args.log)})
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    after = eval_loss()
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        group = trainer.zo_optimizer.param_groups[0]
        passes = 2 * args.n if group["two_sided"] else args.n + 1
        print(f"held-out loss {before:.4f} -> {after:.4f} after {args.steps} {args.optimizer} steps "
              f"({seconds / args.steps * 1e3:.0f} ms/step, {passes}+ forward passes each)")
        if device == "cuda":
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        comm = trainer.zo_optimizer.comm
        if comm.calls:
            print(f"communicated {comm.bytes / comm.calls:.0f} bytes per step (all-reduce of the scalars)")
        if args.log:
            log = trainer.zo_optimizer.log
            with open(args.log, "w") as f:
                f.write(log.to_json())
            print(f"replay log: {args.log}, {log.bytes_per_step()['json']:.0f} JSON bytes / step "
                  f"({log.bytes_per_step()['binary']:.0f} binary); distopt.zo.replay(initial_model, log) "
                  "rebuilds the weights")


if __name__ == "__main__":
    main()
