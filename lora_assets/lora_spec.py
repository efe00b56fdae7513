"""LoRA settings and step budgets, torch-free so mode declarations can carry them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


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
class LearningRate:
    """A full training's learning rate, rising with the user's training examples.

    The fewest steps (``StepBudget.min_steps``, 30) are 11 passes over a 22-example user's data
    but 1.6 over 150 examples: the rate low enough not to overfit the small user by then
    (``base``) leaves a large one under-trained when validation stops it. So from
    ``examples`` training examples on the rate grows in proportion, up to ``maximum``
    (``benchmarks/personalization.py`` on real writing: 3e-4 for every size, 1e-3 for every size,
    and this, measured in the README). ``maximum`` is also the rate of the epochs formula that
    users from ``StepBudget.validate_below`` examples on train (no slice to stop them).
    """

    base: float = 3e-4
    maximum: float = 1e-3
    examples: int = 45

    def for_examples(self, n_examples: int) -> float:
        return min(self.maximum, max(self.base, self.base * n_examples / self.examples))


@dataclass(frozen=True)
class StepBudget:
    """How long an adapter trains.

    With a validation slice (``validation_fraction`` of the training examples, never the gate's
    held-out set) the budget is chosen by validation: training runs to at most ``max_steps``,
    the slice is scored every ``eval_every`` steps from ``first_kept`` on, training stops after
    ``patience`` scores without an improvement of ``min_improvement`` nats, and the adapter of
    the best scored step is kept, or (``average``) the mean of its weights and those of the
    scored steps either side of it where that mean scores better on the slice. With ``refit``
    that pass only chooses: a fresh adapter then trains on every example, the slice's too, for
    the best step's number of steps, and that one is kept (for small users the slice's examples
    are a share worth having; measured on real writing in ``benchmarks/personalization.py``).
    Only users with fewer than ``validate_below`` training examples get a slice: from there on
    ``epochs`` passes over every example at the rate's maximum did better than validation on
    real writing (the slice's examples and a step chosen on them cost more than the choice wins;
    ``benchmarks/personalization.py``, on the development corpus and again on held-out authors).
    A user with too few examples for a slice of ``min_validation`` gets ``epochs`` passes within
    ``[min_steps, max_steps]``, as does a job with no slice (incremental updates): with nothing
    to tell when they stop improving, the smallest users need the longer floor (on real writing
    30 steps at 3e-4 beat 10 for both 22-example authors), while with a slice the users whose
    best step comes early keep it (``first_kept`` 10 rather than 30: measured on 24 authors).
    """

    epochs: float = 2.0  # without a validation slice: passes over the training examples
    min_steps: int = 30  # the epochs formula's floor below ``validate_below`` examples (from there on 2 epochs are 15+ steps)
    validate_below: int | None = 60  # training examples: from here on no slice, ``epochs`` passes at the rate's maximum; None: every size
    first_kept: int = 10  # with a slice: the first step whose adapter may be kept
    max_steps: int = 120  # the last
    eval_every: int = 10  # steps between validation scores
    patience: int = 2  # scores without an improvement of ``min_improvement`` before training stops
    min_improvement: float = 0.01  # nats: less is no reason to train on (a user learned to 0.005 nats stops)
    validation_fraction: float = 0.15  # of the training examples, chosen by hashing their ids
    min_validation: int = 4  # fewer would be noise: no slice, the epochs formula decides
    max_validation: int = 32  # scoring more costs more than it tells
    average: bool = True  # keep the mean of the best and its neighbouring scored steps if it scores better
    refit: bool = True  # then train a fresh adapter on every example, the slice too, for the step chosen

    def steps(self, n_examples: int, batch_size: int) -> int:
        """The formula budget: ``epochs`` passes, at most ``max_steps``, at least ``min_steps``
        for a user below ``validate_below`` (the floor is for users too small for a slice)."""
        floor = self.min_steps if self.validates(n_examples) else 1
        return min(self.max_steps, max(floor, math.ceil(self.epochs * n_examples / batch_size)))

    def capped(self, ceiling: int | None) -> StepBudget:
        """This budget with at most ``ceiling`` steps (a deployment's cost ceiling per adapter):
        validation then scores the ceiling's step too, and the formula stops there."""
        if not ceiling or ceiling >= self.max_steps:
            return self
        return replace(self, max_steps=ceiling, first_kept=min(self.first_kept, ceiling))

    def validates(self, n_examples: int) -> bool:
        """Whether a full training of ``n_examples`` sets a validation slice aside to choose its step."""
        return self.validate_below is None or n_examples < self.validate_below

    def scored(self, step: int, last: int) -> bool:
        """Whether the validation slice is scored after ``step`` of at most ``last``."""
        return step >= self.first_kept and ((step - self.first_kept) % self.eval_every == 0 or step == last)
