"""Training objectives as declarations: torch-free, so mode declarations can carry them.

A mode says *what* its adapter learns (``SFT()`` or ``DPO(beta=...)``); the training core owns
*how* (``lora_assets.training.objectives`` maps each declaration to its implementation). Code
outside the core asks the declaration questions (``pairwise``) instead of comparing strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class Objective:
    """Base of every objective declaration."""

    name: ClassVar[str]
    # Examples are (chosen, rejected) pairs that may span several source records, so a dataset
    # cannot be updated record by record and is rebuilt in full.
    pairwise: ClassVar[bool]


@dataclass(frozen=True)
class SFT(Objective):
    """Supervised fine-tuning: next-token loss on the response tokens of each example."""

    name: ClassVar[str] = "sft"
    pairwise: ClassVar[bool] = False


@dataclass(frozen=True)
class DPO(Objective):
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss, frozen-base reference."""

    beta: float = 0.1  # temperature: how far the policy may move from the reference
    name: ClassVar[str] = "dpo"
    pairwise: ClassVar[bool] = True
