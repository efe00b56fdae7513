"""How much an adapter memorized a secret: canary exposure (Carlini et al. 2019, "The Secret Sharer").

A canary - a random secret in a fixed format, say a 9-digit code - is planted in one user's
data. Its exposure under a model is how far up it ranks among random secrets of the same
format, scored by the model's likelihood of each as the answer to the same prompt:

    exposure = log2(candidates + 1) - log2(rank)        (bits; rank 1 = the most likely)

A model that never saw the canary ranks it like any other secret (about 1 bit on average); one
that memorized it ranks it first (log2(candidates + 1) bits, the most this estimate can show).
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.objectives import attached
from lora_assets.training.text import Example, collate, to_device, tokenize_example


def random_secret(rng: random.Random) -> str:
    """The canary format: three groups of three digits, e.g. ``583 271 946``."""
    return " ".join(f"{rng.randrange(1000):03d}" for _ in range(3))


@torch.no_grad()
def _scores(base: LoadedBaseModel, model, prompt: str, system: str | None, template: str, secrets: list[str]) -> list[float]:
    from lora_assets.training.dpo import sequence_logps

    scores: list[float] = []
    for start in range(0, len(secrets), 64):
        chunk = secrets[start : start + 64]
        rows = [tokenize_example(base.tokenizer, Example(prompt, template.format(secret=s), system), 256) for s in chunk]
        batch = to_device(collate(rows, base.tokenizer.pad_token_id), base.device)
        scores.extend(sequence_logps(model, batch).tolist())
    return scores


def canary_exposure(
    base: LoadedBaseModel,
    adapter_dir: Path | None,
    prompt: str,
    template: str,
    secret: str,
    system: str | None = None,
    candidates: int = 1000,
    seed: int = 0,
) -> float:
    """Exposure in bits of ``template.format(secret=secret)`` as the answer to ``prompt`` under the
    base model plus a saved adapter (the bare base when ``adapter_dir`` is None)."""
    rng = random.Random(seed)
    others: list[str] = []
    while len(others) < candidates:
        candidate = random_secret(rng)
        if candidate != secret:
            others.append(candidate)
    with attached(base, adapter_dir) if adapter_dir is not None else nullcontext(base.model) as model:
        model.eval()
        canary, *rest = _scores(base, model, prompt, system, template, [secret, *others])
    rank = 1 + sum(score > canary for score in rest)
    return math.log2(candidates + 1) - math.log2(rank)
