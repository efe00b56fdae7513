"""Training throughput of the core vs a plain peft + transformers loop, on the same batches.

    .venv/bin/python benchmarks/train_throughput.py [--base-model smollm2-135m] [--steps 6] [--rounds 2]

Both loops train a fresh r=16 q/k/v/o LoRA with AdamW on identical batches (the core's own
``make_batches`` output for a synthetic user's mail_reply data). The plain loop is what one writes
from the peft docs: ``model(**batch, labels=labels).loss``. Rounds alternate plain/core so machine
noise hits both. Printed: tokens/s of each, their ratio, and achieved FLOP/s as a fraction of a
measured fp32 GEMM peak on this machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lora_assets.adapters import job_for
from lora_assets.data.synthetic import generate_user
from lora_assets.modes import MODES, build_examples
from lora_assets.training import load_base_model
from lora_assets.training.core import (
    IGNORE_INDEX,
    make_batches,
    response_loss,
    tokenize_example,
)


def gemm_peak_flops(n: int = 2048, reps: int = 10) -> float:
    """Best-of fp32 matmul FLOP/s on this machine, the ceiling a training step can approach."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def step_flops(model, batch: dict[str, torch.Tensor], head_everywhere: bool) -> float:
    """FLOPs of one LoRA step: forward + input-gradient backward (frozen weights need no dW)."""
    cfg = model.config
    body_params = sum(
        p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n
    )
    tokens = int(batch["attention_mask"].sum())
    width = batch["input_ids"].shape[1]
    head_tokens = tokens if head_everywhere else int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    attn = 4 * cfg.num_hidden_layers * width * cfg.num_attention_heads * cfg.head_dim * tokens
    forward = 2 * body_params * tokens + 2 * cfg.hidden_size * cfg.vocab_size * head_tokens + attn
    return 2 * forward


def run(model, batches, lr: float, core: bool) -> tuple[float, float, float]:
    """Train a fresh LoRA over ``batches``; return (tokens, seconds, flops)."""
    from peft import get_peft_model

    from lora_assets.lora_spec import LoraSpec

    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraSpec().to_peft())
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    tokens = flops = 0.0
    start = time.perf_counter()
    for batch in batches:
        if core:
            loss = response_loss(peft_model, batch)
        else:
            loss = peft_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
        flops += step_flops(peft_model.get_base_model(), batch, head_everywhere=not core)
    seconds = time.perf_counter() - start
    peft_model.unload()
    return tokens, seconds, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak (2048^3 matmul, best of 10): {peak / 1e9:.1f} GFLOP/s")

    base = load_base_model(args.base_model)
    mode = MODES["mail_reply"]
    dataset = build_examples(mode, generate_user("user-000"), "user-000")
    job = job_for(mode, "user-000", dataset, output_dir=Path("unused"), steps=args.steps)
    tokenized = [tokenize_example(base.tokenizer, ex, job.max_length) for ex in job.train]
    batches = make_batches(tokenized, job.batch_size, args.steps + 1, job.seed, base.tokenizer.pad_token_id)
    warmup, batches = batches[:1], batches[1:]
    run(base.model, warmup, job.learning_rate, core=True)  # first step pays one-off allocations

    totals = {"plain": [0.0, 0.0, 0.0], "core": [0.0, 0.0, 0.0]}
    for r in range(args.rounds):
        for name in ("plain", "core"):
            tokens, seconds, flops = run(base.model, batches, job.learning_rate, core=name == "core")
            print(f"round {r + 1} {name:5s}: {tokens / seconds:7.1f} tokens/s  ({tokens:.0f} tokens, {seconds:.1f} s)")
            for i, v in enumerate((tokens, seconds, flops)):
                totals[name][i] += v

    print(f"\nbase model {base.ref.key} ({base.ref.revision}), batch {job.batch_size}, "
          f"{args.steps} steps x {args.rounds} rounds, same batches for both loops")
    rates = {}
    for name, (tokens, seconds, flops) in totals.items():
        rates[name] = tokens / seconds
        print(f"{name:5s}: {rates[name]:7.1f} tokens/s, {flops / seconds / 1e9:5.1f} GFLOP/s "
              f"= {flops / seconds / peak:5.1%} of GEMM peak")
    print(f"ratio core/plain: {rates['core'] / rates['plain']:.2f}x")


if __name__ == "__main__":
    main()
