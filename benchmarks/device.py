"""What a device gets: adapter file sizes by format, the held-out loss each keeps, and llama.cpp speed.

    .venv/bin/python benchmarks/device.py                 # SmolLM2-135M, one user's mail_reply, 8 steps
    .venv/bin/python benchmarks/device.py --steps 1 --prompts 1 --gen-tokens 4     # a quick look

Trains one ``mail_reply`` adapter on a synthetic user with the product's own job construction
(``job_for``) and trainer, which also writes the device file ``adapter.gguf`` as publication does.
8 steps by default: synthetic mail is learned to ~0.01 nats of held-out loss by 30 steps, where a
relative difference says nothing; at 8 steps the loss is ~1.5 nats, nearer real mail's ~3.
Then, on the user's held-out examples (the gate's set, tokenized as the gate does):

- **PEFT** as published for servers and warm starts: the adapter's tensors as fp32 (what peft
  saves), fp16 and bf16 (cast, then loaded back into the fp32 base): file bytes and held-out loss
  with transformers on the fp32 base;
- **GGUF** for llama.cpp devices: f32, f16 and q8_0 ``adapter.gguf`` (``lora_assets.training.
  gguf_lora``): bytes and held-out loss through llama.cpp on the shipped Q4_1 base; the bare Q4_1
  base for reference;
- each format's loss relative to its runtime's fp32 reference (the 0.5 % budget), and llama.cpp's
  loss with the f16 file relative to the gate's fp32 PEFT loss;
- llama.cpp speed on the Q4_1 base with and without the adapter: prefill tokens/s of each
  held-out prompt and greedy decoding tokens/s of exactly ``--gen-tokens`` tokens after it
  (``--prompts`` prompts, one thread per core);
- drive bytes for a million users with the published formats (5 modes x ``--keep`` versions).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODE = "mail_reply"
MODES_PER_USER = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--user", default="user-000")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--keep", type=int, default=3, help="versions kept per adapter (retention)")
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    from lora_assets.adapters import examples_from, job_for
    from lora_assets.data.synthetic import generate_user
    from lora_assets.drive.llama_cpp import eval_loss as cpp_loss
    from lora_assets.drive.llama_cpp import open_llama
    from lora_assets.modes import MODES, build_examples
    from lora_assets.training import DEFAULT_BASE_MODEL, load_base_model, train_adapters
    from lora_assets.training.core import evaluate_adapter
    from lora_assets.training.base_models import device_base_gguf
    from lora_assets.training.gguf_lora import write_gguf_adapter
    from lora_assets.training.text import tokenize_example

    mode = MODES[MODE]
    base = load_base_model(DEFAULT_BASE_MODEL, device="cpu", dtype="fp32")
    q4 = device_base_gguf(DEFAULT_BASE_MODEL)
    dataset = build_examples(mode, generate_user(args.user))
    held_out = examples_from(dataset, "eval")
    tokenized = [tokenize_example(base.tokenizer, ex, 128) for ex in held_out]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp32"
        job = job_for(mode, args.user, dataset, out, steps=args.steps)
        started = time.perf_counter()
        (result,) = train_adapters([job], base, progress=None)
        print(f"SmolLM2-135M {MODE} adapter for {args.user}: {args.steps} steps in {time.perf_counter() - started:.0f} s, "
              f"{len(held_out)} held-out examples; gate loss base {result.base_eval_loss:.4f}, adapter "
              f"{result.adapter_eval_loss:.4f}")

        rows = []  # (format, runtime, bytes, loss, reference loss)
        fp32 = evaluate_adapter(base, out, held_out, job.max_length)
        tensors = load_file(str(out / "adapter_model.safetensors"))
        for name, dtype in (("PEFT fp32", None), ("PEFT fp16", torch.float16), ("PEFT bf16", torch.bfloat16)):
            folder = out if dtype is None else Path(tmp) / name.split()[1]
            if dtype is not None:
                folder.mkdir()
                (folder / "adapter_config.json").write_bytes((out / "adapter_config.json").read_bytes())
                save_file({k: v.to(dtype) for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
            loss = fp32 if dtype is None else evaluate_adapter(base, folder, held_out, job.max_length)
            rows.append((name, "transformers fp32 base", (folder / "adapter_model.safetensors").stat().st_size, loss, fp32))

        config = base.model.config.to_dict()
        bare = cpp_loss(open_llama(q4, None, logits_all=True), tokenized)
        gguf_losses = {}
        for qtype in ("f32", "f16", "q8_0"):
            path = Path(tmp) / f"adapter-{qtype}.gguf"
            write_gguf_adapter(out, config, path, qtype)
            gguf_losses[qtype] = cpp_loss(open_llama(q4, path, logits_all=True), tokenized)
            rows.append((f"GGUF {qtype}", "llama.cpp Q4_1 base", path.stat().st_size, gguf_losses[qtype], None))
        rows = [(n, rt, b, loss, ref if ref is not None else gguf_losses["f32"]) for n, rt, b, loss, ref in rows]

        print(f"\n{'format':<10} {'runtime':<24} {'bytes':>10} {'held-out loss':>14} {'vs fp32 (nats)':>15} {'vs fp32':>9}")
        for name, runtime, size, loss, ref in rows:
            print(f"{name:<10} {runtime:<24} {size:>10,} {loss:>14.4f} {loss - ref:>+15.4f} {100 * (loss - ref) / ref:>+8.2f}%")
        print(f"{'(none)':<10} {'llama.cpp Q4_1 base':<24} {'':>10} {bare:>14.4f}")
        agreement = 100 * (gguf_losses["f16"] - result.adapter_eval_loss) / result.adapter_eval_loss
        print(f"\nllama.cpp (Q4_1 + f16 adapter.gguf) vs the gate's fp32 PEFT loss: {agreement:+.2f}% "
              f"({gguf_losses['f16'] - result.adapter_eval_loss:+.4f} nats)")

        _speed(q4, Path(tmp) / "adapter-f16.gguf", mode, held_out[: args.prompts], args.gen_tokens)
        sizes = {name: size for name, _rt, size, _l, _r in rows}
        _million(sizes, args.keep)


def _speed(q4: Path, adapter: Path, mode, examples, gen_tokens: int) -> None:
    from lora_assets.drive.llama_cpp import open_llama

    for label, path in (("Q4_1 base alone", None), ("Q4_1 base + adapter.gguf", adapter)):
        llm = open_llama(q4, path, n_ctx=1024)
        prompts = [llm.tokenize(_rendered(llm, mode, ex).encode(), add_bos=False, special=True) for ex in examples]
        _decode(llm, prompts[0], 4)  # warm up
        prefill = decode = 0.0
        prompt_tokens = 0
        for ids in prompts:
            first, rest = _decode(llm, ids, gen_tokens)
            prefill, decode, prompt_tokens = prefill + first, decode + rest, prompt_tokens + len(ids)
        print(f"llama.cpp {label:<26} prefill {prompt_tokens / prefill:7.1f} tokens/s, decode "
              f"{len(prompts) * (gen_tokens - 1) / decode:6.1f} tokens/s ({len(prompts)} prompts, {gen_tokens} tokens each)")


def _rendered(llm, mode, example) -> str:
    """The chat prompt as llama.cpp's own chat handler renders it from the GGUF's template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata["tokenizer.chat_template"]
    formatter = Jinja2ChatFormatter(template, eos_token="", bos_token="", add_generation_prompt=True)
    messages = [{"role": "system", "content": mode.system}, {"role": "user", "content": example.prompt}]
    return formatter(messages=messages).prompt


def _decode(llm, ids: list[int], n: int) -> tuple[float, float]:
    """Seconds to the first greedy token (prefill) and for the ``n - 1`` after it (decoding)."""
    llm.reset()
    started = time.perf_counter()
    first = None
    for i, _token in enumerate(llm.generate(ids, temp=0.0, top_k=1, reset=True)):
        if i == 0:
            first = time.perf_counter() - started
        if i == n - 1:
            break
    return first, time.perf_counter() - started - first


def _million(sizes: dict[str, int], keep: int) -> None:
    users = 1_000_000
    for label, files in (("fp32 PEFT only (before)", ["PEFT fp32"]),
                         ("fp32 PEFT + f16 GGUF", ["PEFT fp32", "GGUF f16"]),
                         ("fp16 PEFT + q8_0 GGUF", ["PEFT fp16", "GGUF q8_0"]),
                         ("fp16 PEFT + f16 GGUF", ["PEFT fp16", "GGUF f16"])):
        per_version = sum(sizes[f] for f in files)
        total = per_version * MODES_PER_USER * keep * users
        print(f"a million users, {MODES_PER_USER} modes x {keep} versions, {label}: {total / 1e12:.1f} TB "
              f"({per_version / 1e6:.2f} MB per version)")
    print(json.dumps({"sizes": sizes}))


if __name__ == "__main__":
    main()
