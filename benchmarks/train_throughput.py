"""Training throughput of the core vs a plain peft + transformers loop, and fused vs sequential.

    .venv/bin/python benchmarks/train_throughput.py [--base-model smollm2-135m] [--steps 6] [--rounds 2]
        [--fused 1 4 8 16] [--fused-steps 3] [--fusion interleaved|batched]

Both loops train a fresh r=16 q/k/v/o LoRA with AdamW on identical batches (the core's own
``make_batches`` output for a synthetic user's mail_reply data). The plain loop is what one writes
from the peft docs: ``model(**batch, labels=labels).loss``. Rounds alternate plain/core so machine
noise hits both. Printed: tokens/s of each, their ratio, and achieved FLOP/s as a fraction of a
measured fp32 GEMM peak on this machine.

Then, for each K of ``--fused``: K users' mail_reply adapters trained by ``train_adapters``
sequentially (peft's own LoRA layers, one job after another) and fused (one group of K;
``--fusion interleaved``, the default here: one job's rows per pass, what fusing on a CPU would
be; ``batched``: all K jobs' rows in each pass), on the same jobs, for ``--rounds`` rounds after a
warm-up, alternating which goes first. Printed per K: training-loop tokens/s and fraction of the GEMM peak of
both, adapters per hour of the whole call (evaluation and saving included), and fused/sequential.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from lora_assets.adapters import job_for
from lora_assets.data.synthetic import generate_user
from lora_assets.modes import MODES, build_examples
from lora_assets.training import load_base_model, train_adapters
from lora_assets.training.text import (
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
    parser.add_argument("--fused", type=int, nargs="*", default=[1, 4, 8, 16], help="K values (none: skip)")
    parser.add_argument("--fused-steps", type=int, default=3)
    parser.add_argument("--fusion", default="interleaved", choices=["interleaved", "batched"])
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = gemm_peak_flops()
    print(f"fp32 GEMM peak (2048^3 matmul, best of 10): {peak / 1e9:.1f} GFLOP/s")

    base = load_base_model(args.base_model)
    mode = MODES["mail_reply"]
    dataset = build_examples(mode, generate_user("user-000"))
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
    if args.fused:
        fused_vs_sequential(base, args.fused, args.fused_steps, args.rounds, peak, args.fusion)


def job_flops(base, job) -> float:
    """FLOPs of a job's training steps, counted on its own batches as ``step_flops`` does."""
    tokenized = [tokenize_example(base.tokenizer, ex, job.max_length) for ex in job.train]
    batches = make_batches(tokenized, job.batch_size, job.steps, job.seed, base.tokenizer.pad_token_id)
    return sum(step_flops(base.model, b, head_everywhere=False) for b in batches)


def loop_seconds(results) -> float:
    """Training-loop seconds of one call: each lone job's own, plus its group's for fused ones
    (one group of K here: the longest job's ``group_seconds``)."""
    alone = sum(r.seconds for r in results if r.fused_with == 1)
    return alone + max((r.group_seconds for r in results if r.fused_with > 1), default=0.0)


def fused_vs_sequential(base, ks: list[int], steps: int, rounds: int, peak: float, fusion: str) -> None:
    """K users' adapters, sequential vs fused, same jobs, alternating rounds after a warm-up."""
    mode = MODES["mail_reply"]
    users = [f"user-{i:03d}" for i in range(max(ks))]
    datasets = {u: build_examples(mode, generate_user(u)) for u in users}
    print(f"\nfused vs sequential: mail_reply adapters of K users, {steps} steps each, batch 8 x <=128 tokens, "
          f"{rounds} alternating rounds")
    print(f"{'K':>3}  {'sequential tok/s':>16} {'peak':>6}  {'fused tok/s':>11} {'peak':>6}  "
          f"{'seq adapters/h':>14} {'fused adapters/h':>16}  {'ratio':>5}")
    with tempfile.TemporaryDirectory() as tmp:
        warm = [job_for(mode, users[0], datasets[users[0]], Path(tmp) / "warm", steps=1)]
        for variant in ("sequential", fusion):  # first steps pay one-off allocations and kernel selection
            train_adapters(warm * 2, base, progress=None, fusion=variant)
        for k in ks:
            jobs = [job_for(mode, u, datasets[u], Path(tmp) / u, steps=steps) for u in users[:k]]
            flops = sum(job_flops(base, j) for j in jobs)
            totals = {"sequential": [0.0, 0.0, 0.0], "fused": [0.0, 0.0, 0.0]}  # tokens, loop s, wall s
            for r in range(rounds):
                order = (("sequential", "sequential"), ("fused", fusion))
                for name, variant in order if r % 2 == 0 else order[::-1]:  # neither always goes first
                    out = [replace(j, output_dir=Path(tmp) / name / j.name) for j in jobs]
                    start = time.perf_counter()
                    results = train_adapters(out, base, progress=None, fusion=variant, fuse=k)
                    totals[name][2] += time.perf_counter() - start
                    totals[name][1] += loop_seconds(results)
                    totals[name][0] += sum(r.total_tokens for r in results)
            row = {n: (t / loop, flops * rounds / loop / peak, k * rounds / wall * 3600) for n, (t, loop, wall) in totals.items()}
            (st, sp, sh), (ft, fp, fh) = row["sequential"], row["fused"]
            print(f"{k:>3}  {st:>16.1f} {sp:>6.1%}  {ft:>11.1f} {fp:>6.1%}  {sh:>14.0f} {fh:>16.0f}  {fh / sh:>4.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
