"""On the device: llama.cpp itself runs a published ``adapter.gguf`` on the shipped Q4_1 base.

One SmolLM2 adapter for the module, trained, gated and published by the product
(``lora-assets demo``), synced to a device folder with ``lora-assets sync``, then loaded by
llama.cpp (``llama-cpp-python``, built from its sdist) next to the quantized GGUF the fp32 base
was dequantized from.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_assets_tests.harness import lora_assets

pytestmark = pytest.mark.slow

MODE = "mail_reply"
USER = "user-000"
BASE = "smollm2-135m"


@pytest.fixture(scope="module")
def device(tmp_path_factory, home):
    """A device folder holding the user's synced adapter (both formats) and the product's data dir."""
    from lora_assets.training import load_base_model

    load_base_model(BASE, home)  # the one-off GGUF -> safetensors conversion, shared with the demo
    tmp = tmp_path_factory.mktemp("device")
    data = tmp / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    env = {**os.environ, "LORA_ASSETS_HOME": str(data), "DAGSTER_HOME": str(tmp / "dagster")}
    lora_assets("demo", "--base-model", BASE, "--users", "1", "--modes", MODE, "--steps", "24", env=env)  # at the mode's 3e-4
    lora_assets("sync", "--user", USER, "--device-dir", str(tmp / "device"), "--base-model", BASE, env=env)
    return {"dir": tmp / "device", "env": env, "data": data}


@pytest.fixture(scope="module")
def held_out(device, home):
    """The gate's held-out examples of the user, tokenized as training and the gate tokenize them."""
    from lora_assets.adapters import examples_from
    from lora_assets.datasets import read_dataset
    from lora_assets.settings import Settings
    from lora_assets.training import load_base_model
    from lora_assets.training.text import tokenize_example

    settings = Settings.from_env(home=device["data"])
    df, _ = read_dataset(settings.datasets(), USER, MODE)
    tokenizer = load_base_model(BASE, home).tokenizer
    return [tokenize_example(tokenizer, ex, 128) for ex in examples_from(df, "eval")]


def _installed(device) -> Path:
    from lora_assets.drive.sync import installed_adapter_dir

    return installed_adapter_dir(device["dir"], BASE, MODE)


def test_the_product_publishes_fp16_peft_and_q8_0_gguf_by_default(device):
    import gguf
    from safetensors import safe_open

    folder = _installed(device)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    types = {t.name.rsplit(".", 1)[1]: t.tensor_type.name for t in gguf.GGUFReader(folder / "adapter.gguf").tensors}
    assert types == {"lora_a": "Q8_0", "lora_b": "F16"}  # a lora_b row (r=16 values) is too short for q8_0 blocks
    meta = json.loads((folder / "lora_assets.json").read_text())
    assert meta["device_files"] == {"adapter.gguf": "q8_0"}


def test_llama_cpp_applies_the_published_adapter_and_agrees_with_peft_on_the_fp32_base(device, held_out, home):
    from lora_assets.drive.llama_cpp import open_llama, token_logprobs
    from lora_assets.training import load_base_model
    from lora_assets.training.base_models import device_base_gguf
    from lora_assets.training.inference import load_adapter

    folder = _installed(device)
    q4 = device_base_gguf(BASE)
    with_adapter = open_llama(q4, folder / "adapter.gguf", logits_all=True)
    bare = open_llama(q4, None, logits_all=True)
    base = load_base_model(BASE, home)
    peft = load_adapter(base, folder)
    try:
        gaps = {"adapter": [], "base": []}  # |log p(next token)| llama.cpp Q4_1 vs transformers fp32
        moved = 0.0
        for example in held_out[:4]:
            ids, labels = example.input_ids, example.labels
            cpp, cpp_bare = token_logprobs(with_adapter, ids), token_logprobs(bare, ids)
            with torch.no_grad():
                ref = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
                with peft.disable_adapter():
                    ref_bare = torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
            rows = [t - 1 for t in range(1, len(ids)) if labels[t] != -100]
            targets = [ids[t + 1] for t in rows]
            gaps["adapter"] += list(np.abs(cpp[rows, targets] - ref[rows, targets]))
            gaps["base"] += list(np.abs(cpp_bare[rows, targets] - ref_bare[rows, targets]))
            moved = max(moved, float(np.abs(cpp[rows, targets] - cpp_bare[rows, targets]).max()))
        stats = {k: (float(np.mean(v)), float(np.percentile(v, 95)), float(np.max(v))) for k, v in gaps.items()}
        print("|log p(next token)| llama.cpp Q4_1 vs fp32, mean / p95 / max: "
              + "; ".join(f"{k} {m:.4f} / {p:.4f} / {x:.4f}" for k, (m, p, x) in stats.items())
              + f"; the adapter moved llama.cpp's log p by up to {moved:.2f}")
        assert moved > 1.0, "the adapter changes llama.cpp's logits (not a no-op)"
        # The Q4_1 weights are exactly the fp32 base's; what differs is llama.cpp quantizing the
        # activations (q8) for its integer dot products. The adapter adds no error of its own:
        # with it, llama.cpp agrees with peft as closely as the bare runtimes agree.
        assert stats["adapter"][0] < 0.05 and stats["adapter"][0] < 2 * stats["base"][0] + 0.01
    finally:
        base.model = peft.unload()


def test_held_out_loss_through_llama_cpp_is_the_gates_within_one_percent_and_beats_the_bare_base(device, held_out):
    from lora_assets.drive.llama_cpp import eval_loss, open_llama
    from lora_assets.training.base_models import device_base_gguf

    folder = _installed(device)
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    q4 = device_base_gguf(BASE)
    adapted = eval_loss(open_llama(q4, folder / "adapter.gguf", logits_all=True), held_out)
    bare = eval_loss(open_llama(q4, None, logits_all=True), held_out)
    print(f"held-out loss: gate (PEFT, fp32) {metrics['adapter_eval_loss']:.4f}, llama.cpp Q4_1 + adapter.gguf "
          f"{adapted:.4f}, llama.cpp bare {bare:.4f} (gate's base {metrics['base_eval_loss']:.4f})")
    assert abs(adapted - metrics["adapter_eval_loss"]) <= 0.01 * metrics["adapter_eval_loss"]
    assert adapted < bare - 0.1


def test_generate_answers_through_llama_cpp_on_the_device_files(device):
    cmd = ["generate", "--device-dir", str(device["dir"]), "--base-model", BASE, "--mode", MODE,
           "--max-new-tokens", "24", "--runtime", "llama-cpp", "From: Sam\nSubject: Dinner?\n\nDinner on Friday?"]
    adapted = lora_assets(*cmd, env=device["env"]).stdout.strip()
    bare = lora_assets(*cmd, "--no-adapter", env=device["env"]).stdout.strip()
    assert adapted and adapted != bare, (adapted, bare)
    peft = lora_assets(*[c for c in cmd if c not in ("--runtime", "llama-cpp")], env=device["env"]).stdout.strip()
    print(f"llama.cpp: {adapted!r}\npeft fp32: {peft!r}\nbare llama.cpp: {bare!r}")
    # A q8_0 adapter on the Q4_1 base is not the fp32 peft model: where two tokens nearly tie,
    # greedy decoding may take the other (a leading "Sam," is dropped on an AVX2-only CPU, kept
    # with AVX-512), so the answers are compared word by word rather than token for token.
    assert _alike(adapted, peft) >= 0.6 > _alike(bare, peft), "llama.cpp says what peft says, the bare base does not"


def _alike(a: str, b: str) -> float:
    """Share of words two answers have in common, in order (difflib's ratio on lowercase words)."""
    import difflib
    import re

    return difflib.SequenceMatcher(None, *(re.findall(r"[a-z']+", s.lower()) for s in (a, b))).ratio()


def test_the_device_benchmark_prints_sizes_loss_agreement_and_speed(home):
    import re

    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "device.py"), "--steps", "1",
         "--prompts", "1", "--gen-tokens", "4"],
        env={**os.environ, "LORA_ASSETS_HOME": str(home)}, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for fmt in ("PEFT fp32", "PEFT fp16", "PEFT bf16", "GGUF f32", "GGUF f16", "GGUF q8_0"):
        assert re.search(rf"^{fmt}\s+.+\s+[\d,]+\s+\d+\.\d{{4}}\s+[+-]\d+\.\d{{4}}\s+[+-]\d+\.\d\d%$", done.stdout, re.M), done.stdout
    assert re.search(r"vs the gate's fp32 PEFT loss: [+-]\d+\.\d\d%", done.stdout)
    assert len(re.findall(r"decode\s+\d+\.\d tokens/s", done.stdout)) == 2
    assert "a million users" in done.stdout
