"""LoRA settings, torch-free so mode declarations can carry them without importing torch."""

from __future__ import annotations

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
