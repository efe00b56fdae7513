"""Early stopping: the validation slice chooses the step an adapter is kept at.

One object per job, used the same way by the sequential loop (``core``) and the fused trainer
(``fused``): after each step ``after_step`` scores the slice where the budget says to, keeps a
copy of the LoRA weights of the best score so far, and says when ``patience`` scores in a row
did not improve on it; ``finish`` puts the best weights back. Only steps from the budget's
``min_steps`` on are candidates, so a small user is never kept at an under-trained step. The
step kept is the best scored one; training goes on only while scores improve by the budget's
``min_improvement``, so a user already learned to a few thousandths of a nat stops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lora_assets.training.jobs import TrainJob

Weights = Any  # whatever ``snapshot`` returns and ``restore`` takes (cloned LoRA tensors)


class EarlyStopping:
    def __init__(
        self,
        job: TrainJob,
        validate: Callable[[], float | None],
        snapshot: Callable[[], Weights],
        restore: Callable[[Weights], None],
    ) -> None:
        self.job, self.validate, self.snapshot, self.restore = job, validate, snapshot, restore
        self.curve: list[tuple[int, float]] = []
        self.best_step: int | None = None
        self._best_loss = float("inf")  # the best score: its weights are kept
        self._target = float("inf")  # what a score must beat to count as progress
        self._best: Weights = None
        self._without_progress = 0
        self._last = 0

    def after_step(self, step: int) -> bool:
        """Score the slice if ``step`` is a scored one; True when training should stop now."""
        self._last = step
        if not self.job.early_stopping or not self.job.budget.scored(step, self.job.steps):
            return False
        loss = self.validate()
        if loss is None:
            return False
        self.curve.append((step, loss))
        if loss < self._best_loss:
            self._best_loss, self.best_step = loss, step
            self._best = self.snapshot()
        if loss < self._target:
            self._target, self._without_progress = loss - self.job.budget.min_improvement, 0
        else:
            self._without_progress += 1
        return self._without_progress >= self.job.budget.patience

    def finish(self) -> None:
        """Put the best scored step's weights back (nothing to do when that is the last step)."""
        if self.best_step is not None and self.best_step != self._last:
            self.restore(self._best)
        self._best = None
