"""What a training call takes and gives back: jobs, results, and the error for bad data."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_assets.lora_spec import LoraSpec, StepBudget
from lora_assets.objective import SFT, Objective


class InvalidTrainingData(ValueError):
    """A job's examples cannot be trained on; the message names the job and the example."""


@dataclass(frozen=True)
class ChosenStep:
    """What the validation pass that chose a refit's steps recorded (kept on the refit's result)."""

    best_step: int  # the step validation kept: the refit trains this many
    validation_curve: list[tuple[int, float]]  # (step, validation loss) as scored
    validation_loss: float | None  # the slice's score of the weights that pass kept
    steps: int  # the steps that pass trained


@dataclass
class TrainJob:
    """Everything needed to train one adapter."""

    name: str  # shown in progress and errors, e.g. "alice/mail_reply"
    train: Sequence[Any]  # Example for SFT, PreferencePair for DPO
    output_dir: Path
    eval: Sequence[Any] = ()  # the gate's held-out set: never trained on, never used to choose a step
    validation: Sequence[Any] = ()  # a slice of the training examples that chooses the step (early stopping)
    retrievable: Sequence[Any] = ()  # what the retrieval baseline may show: the user's training examples (default train + validation)
    objective: Objective = field(default_factory=SFT)
    lora: LoraSpec = field(default_factory=LoraSpec)
    max_steps: int | None = 20  # a fixed step budget; when None, ``budget`` decides
    budget: StepBudget = field(default_factory=StepBudget)  # epochs over ``train``, within bounds
    batch_size: int = 8
    max_length: int = 128  # tokens per example, prompt truncated from the left first
    learning_rate: float = 1e-3  # high for LoRA, but runs are tens of steps, not thousands
    decay_to: float = 1.0  # the rate falls linearly to this share of itself over ``steps`` (1: constant)
    seed: int = 0
    warm_start_from: Path | None = None  # previous adapter dir to continue from
    # The files written (the product passes its settings: fp16 PEFT and q8_0 GGUF by default):
    gguf_type: str = "f16"  # adapter.gguf for llama.cpp devices beside the PEFT files: f32, f16, q8_0; "" for none
    peft_dtype: str = "fp32"  # dtype of the saved adapter_model.safetensors: fp32 (what peft trains in), fp16, bf16
    metadata: dict[str, Any] = field(default_factory=dict)  # copied into lora_assets.json
    chosen: ChosenStep | None = None  # a refit: what the validation pass that chose its steps recorded

    @property
    def steps(self) -> int:
        """The most steps it may train: ``max_steps``; with a validation slice the budget's
        ``max_steps`` (early stopping ends it sooner); else the budget's epochs formula."""
        if self.max_steps is not None:
            if self.max_steps < 1:
                raise InvalidTrainingData(f"job {self.name!r}: max_steps must be >= 1")
            return self.max_steps
        if self.early_stopping:
            return self.budget.max_steps
        return self.budget.steps(len(self.train), self.batch_size)

    def to_optimizer(self, params: Sequence[Any]) -> tuple[Any, Any]:
        """AdamW at ``learning_rate`` and its schedule (``rate_factor``), the same for both
        training loops; step the schedule after each optimizer step (torch imported only here)."""
        import torch

        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=0.0)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, self.rate_factor)

    def rate_factor(self, step: int) -> float:
        """The share of ``learning_rate`` step ``step`` (from 0) trains at: linear from 1 to
        ``decay_to`` over the most steps the job may train, so where early stopping ends it
        does not change the schedule of the steps before."""
        return 1.0 - (1.0 - self.decay_to) * step / self.steps

    @property
    def early_stopping(self) -> bool:
        """Whether validation chooses the step: a slice is given and no fixed ``max_steps``."""
        return bool(self.validation) and self.max_steps is None

    @property
    def refits(self) -> bool:
        """Whether validation only chooses the steps and a refit on every example is kept."""
        return self.early_stopping and self.budget.refit

    def refitted(self, chosen: ChosenStep) -> TrainJob:
        """The refit: every example, the slice too, for the steps validation chose, from scratch."""
        return replace(self, train=[*self.train, *self.validation], validation=(), max_steps=chosen.best_step,
                       chosen=chosen)


@dataclass
class TrainResult:
    """What one job produced: where the adapter is and how training went."""

    name: str
    output_dir: Path
    base_model: str
    base_model_revision: str
    steps: int
    loss_curve: list[float]
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    train_tokens: int  # supervised (response) tokens seen
    total_tokens: int  # all non-pad tokens processed
    # What was measured, and nothing allotted: a job trained alone has its own wall time; a
    # fused job shared every pass, so only its group's time and size are known.
    seconds: float | None  # its own training wall time; None when it trained in a fused group
    tokens_per_second: float | None  # total_tokens / seconds; None in a fused group
    extra_metrics: dict[str, float] = field(default_factory=dict)  # e.g. DPO accuracy before/after
    fused_with: int = 1  # jobs of the fused group it trained in (1: alone)
    group_seconds: float | None = None  # the group's training time from its first step to this job's last
    group_tokens_per_second: float | None = None  # tokens of the whole group / group_seconds
    best_step: int | None = None  # the step whose adapter was kept (early stopping); None: the last
    validation_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss) as scored
    averaged: bool = False  # the kept weights are the mean of the best scored step's and its neighbours'
    validation_loss: float | None = None  # the validation slice's score of the kept weights
    refit: bool = False  # validation chose ``best_step``; the adapter kept was then trained on every example
    validation_steps: int | None = None  # a refit: the steps its validation pass trained to choose

    def timing(self) -> dict[str, Any]:
        """The timing figures that apply, under names that say whose they are."""
        if self.fused_with == 1:
            return {"train_seconds": self.seconds, "tokens_per_second": self.tokens_per_second}
        return {"group_seconds": self.group_seconds, "group_tokens_per_second": self.group_tokens_per_second,
                "fused_with": self.fused_with}

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


ProgressFn = Callable[[str, int, int, float, float], None]


def print_progress(job: str, step: int, total: int, loss: float, tokens_per_s: float) -> None:
    """Default progress: one line per step on stderr."""
    print(
        f"  [{job}] step {step}/{total} loss {loss:.4f} {tokens_per_s:.0f} tok/s",
        file=sys.stderr,
        flush=True,
    )


def validate_examples(job_name: str, examples: Sequence[Any], split: str, kind: type, fields: Sequence[str]) -> None:
    """Raise InvalidTrainingData naming the job and the first bad example."""
    noun = "preference pairs" if kind.__name__ == "PreferencePair" else "training examples"
    if split == "train" and not examples:
        raise InvalidTrainingData(f"job {job_name!r}: no {noun}")
    item = "pair" if kind.__name__ == "PreferencePair" else "example"
    for i, ex in enumerate(examples):
        where = f"job {job_name!r}: {split} {item} {i}" + (f" (id={ex.id})" if getattr(ex, "id", "") else "")
        if not isinstance(ex, kind):
            raise InvalidTrainingData(f"{where}: expected {kind.__name__}, got {type(ex).__name__}")
        for fld in fields:
            value = getattr(ex, fld)
            if not isinstance(value, str):
                raise InvalidTrainingData(f"{where}: {fld} must be a string, got {value!r}")
            if not value.strip():
                raise InvalidTrainingData(f"{where}: empty {fld}")
        if ex.system is not None and not isinstance(ex.system, str):
            raise InvalidTrainingData(f"{where}: system must be a string or None")
