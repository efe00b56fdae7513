"""Early stopping: the validation slice chooses the step an adapter is kept at.

One object per job, used the same way by the sequential loop (``core``) and the fused trainer
(``fused``): after each step ``after_step`` scores the slice where the budget says to, keeps a
copy of the LoRA weights of the best score so far, and says when ``patience`` scores in a row
did not improve on it; ``finish`` puts the best weights back. Only steps from the budget's
``first_kept`` on are candidates, so a small user is never kept at an under-trained step. The
step kept is the best scored one; training goes on only while scores improve by the budget's
``min_improvement``, so a user already learned to a few thousandths of a nat stops. With the
budget's ``average`` (the default), ``finish`` also scores the mean of the best step's weights and
those of its scored neighbours, and keeps whichever scores better on the slice; not for a job that
``refits``, whose pass only chooses the number of steps (``core.train_adapters``).
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
        # With ``budget.average``: the weights of the scored steps either side of the best.
        self._previous: Weights = None  # the last scored step's
        self._before: Weights = None
        self._after: Weights = None
        self.averaged: bool = False  # whether the kept weights are the average (``finish``)

    def record(self) -> dict[str, Any]:
        """The ``TrainResult`` fields of what was chosen: this pass's, or for a refit (which has no
        slice) those of the validation pass that chose its steps."""
        chosen = self.job.chosen
        if chosen is not None:
            return {"best_step": chosen.best_step, "validation_curve": list(chosen.validation_curve),
                    "averaged": False, "validation_loss": chosen.validation_loss, "refit": True,
                    "validation_steps": chosen.steps}
        return {"best_step": self.best_step, "validation_curve": self.curve, "averaged": self.averaged,
                "validation_loss": self.kept_loss}

    @property
    def kept_loss(self) -> float | None:
        """The slice's score of the weights kept: the best step's, or their mean's (``finish``)."""
        return None if self.best_step is None else self._best_loss

    def after_step(self, step: int) -> bool:
        """Score the slice if ``step`` is a scored one; True when training should stop now."""
        self._last = step
        if not self.job.early_stopping or not self.job.budget.scored(step, self.job.steps):
            return False
        loss = self.validate()
        if loss is None:
            return False
        self.curve.append((step, loss))
        # A refit keeps another adapter: only the best step's number matters, not a mean of weights.
        average = self.job.budget.average and not self.job.refits
        if loss < self._best_loss:
            self._best_loss, self.best_step = loss, step
            self._before, self._after = (self._previous if average else None), None
            self._best = self.snapshot()
            self._previous = self._best if average else None
        elif average:
            self._previous = self.snapshot()
            if self._after is None:
                self._after = self._previous
        if loss < self._target:
            self._target, self._without_progress = loss - self.job.budget.min_improvement, 0
        else:
            self._without_progress += 1
        return self._without_progress >= self.job.budget.patience

    def finish(self) -> None:
        """Put the best scored step's weights back (nothing to do when that is the last step).

        With ``budget.average``, first try the mean of the best scored step's weights and those
        of the scored steps either side of it, and keep that mean if it scores better on the
        slice: checkpoints of a noisy trajectory average to a flatter point (as in SWA and
        latest-weight averaging). LoRA's A and B are averaged each; for checkpoints 10 steps
        apart the product of the means is near the mean of the products, and the slice decides.
        """
        neighbours = [w for w in (self._before, self._after) if w is not None]
        if self._best is not None and neighbours:
            members = [self._best, *neighbours]
            self.restore([sum(ts) / len(members) for ts in zip(*members)])
            loss = self.validate()
            if loss is not None and loss < self._best_loss:
                self._best_loss, self.averaged = loss, True
            else:
                self.restore(self._best)
        elif self.best_step is not None and self.best_step != self._last:
            self.restore(self._best)
        self._best = self._previous = self._before = self._after = None
