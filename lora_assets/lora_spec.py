"""LoRA settings and step budgets, torch-free so mode declarations can carry them."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters. Defaults follow Apple's on-device adapters (r=16 on attention)."""

    r: int = 16  # rank of the update matrices
    alpha: int = 32  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the LoRA input; 0 keeps short runs deterministic and fast
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def to_peft(self):
        """The equivalent ``peft.LoraConfig`` (peft imported only when training)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


@dataclass(frozen=True)
class StepBudget:
    """How long an adapter trains: ``epochs`` passes over its training examples, kept within
    ``[min_steps, max_steps]`` so that a user with 20 examples is not trained for a dozen epochs
    nor one with 1,000 for a fraction of one. Chosen from ``benchmarks/incremental.py``."""

    epochs: float = 2.0
    min_steps: int = 10
    max_steps: int = 120

    def steps(self, n_examples: int, batch_size: int) -> int:
        return min(self.max_steps, max(self.min_steps, math.ceil(self.epochs * n_examples / batch_size)))
