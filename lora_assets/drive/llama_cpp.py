"""What a device does with a synced ``adapter.gguf``: llama.cpp on the quantized base model.

This is the on-device runtime, run here through ``llama-cpp-python`` (llama.cpp built from its
sdist): the base is the shipped quantized GGUF (SmolLM2-135M Q4_1 for ``smollm2-135m``) and the
adapter is applied at run time as ``W x + scale * B (A x)`` on the quantized ``W``, exactly as a
phone app using llama.cpp would (``llama_adapter_lora_init`` + ``llama_set_adapters_lora``).

Used by ``lora-assets generate --runtime llama-cpp``, ``benchmarks/device.py`` and the tests
that check a published ``adapter.gguf`` against the PEFT adapter it was built from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IGNORE_INDEX = -100


class LlamaCppUnavailable(RuntimeError):
    """llama-cpp-python is not installed (the ``device`` extra builds it)."""


def open_llama(base_gguf: Path, adapter_gguf: Path | None = None, n_ctx: int = 512, logits_all: bool = False,
               threads: int | None = None):
    """A ``llama_cpp.Llama`` on ``base_gguf`` with ``adapter_gguf`` applied (scale 1), or the bare
    base; ``threads`` defaults to every core."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LlamaCppUnavailable("the llama-cpp runtime needs llama-cpp-python: pip install -e '.[device]'") from None
    for path in (base_gguf, adapter_gguf):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such GGUF file")
    threads = threads or os.cpu_count() or 1
    try:
        return Llama(model_path=str(base_gguf), lora_path=str(adapter_gguf) if adapter_gguf else None,
                     n_ctx=n_ctx, logits_all=logits_all, n_threads=threads, n_threads_batch=threads,
                     seed=0, verbose=False)
    except ValueError as exc:  # llama.cpp refused a file: say which
        raise ValueError(f"llama.cpp could not load {adapter_gguf or base_gguf}: {exc}") from None


def chat(llm, prompt: str, system: str | None = None, max_new_tokens: int = 64) -> str:
    """Greedy completion of one chat turn with the chat template in the base GGUF, the rendering
    the adapter was trained on (the tokenizer this project trains with is built from that GGUF)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    out = llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                     seed=0)
    return (out["choices"][0]["message"]["content"] or "").strip()


def token_logprobs(llm, input_ids: Sequence[int]) -> np.ndarray:
    """Log-probabilities (positions x vocabulary) llama.cpp gives the next token after each
    prefix of ``input_ids``; ``llm`` must be opened with ``logits_all=True``."""
    llm.reset()
    llm.eval(list(input_ids))
    logits = np.asarray(llm.scores[: len(input_ids)], dtype=np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def response_nll(llm, input_ids: Sequence[int], labels: Sequence[int]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over the supervised positions of one tokenized
    example (``labels`` != -100, as training and the gate count them) and how many there are."""
    logprobs = token_logprobs(llm, input_ids)
    total, count = 0.0, 0
    for t in range(1, len(input_ids)):
        if labels[t] != IGNORE_INDEX:
            total -= float(logprobs[t - 1, labels[t]])
            count += 1
    return total, count


def eval_loss(llm, tokenized: Sequence) -> float:
    """Token-weighted mean response loss over tokenized examples (``input_ids``/``labels``),
    the figure the eval gate records, computed by llama.cpp."""
    total, count = 0.0, 0
    for example in tokenized:
        nll, n = response_nll(llm, example.input_ids, example.labels)
        total, count = total + nll, count + n
    return total / count
