"""Glue from a mode's dataset to a training job, and where adapters live. No dagster here.

Every retrain is planned here: a full training from scratch, or an incremental update that
continues from the user's published adapter (``plan_update``). The Dagster assets, the batch
runs and the benchmarks all build their jobs through ``job_for``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lora_assets.modes import Mode
from lora_assets.training.dpo import PreferencePair
from lora_assets.training.jobs import TrainJob
from lora_assets.training.text import Example


def adapter_dir(home: Path, base_model: str, user: str, mode: str) -> Path:
    """The working copy of a user's adapter for one mode and base model."""
    return Path(home) / "adapters" / base_model / user / mode


def examples_from(dataset: pd.DataFrame, split: str) -> list[Example]:
    rows = dataset[dataset["split"] == split]
    return [
        Example(prompt=r.prompt, response=r.response, system=r.system, id=r.example_id)
        for r in rows.itertuples(index=False)
    ]


def pairs_from(dataset: pd.DataFrame, split: str) -> list[PreferencePair]:
    """Preference pairs of a pairwise dataset (chosen in ``response``, the other in ``rejected``)."""
    rows = dataset[dataset["split"] == split]
    return [
        PreferencePair(r.prompt, r.response, r.rejected, r.system, r.example_id)
        for r in rows.itertuples(index=False)
    ]


FULL, INCREMENTAL = "full", "incremental"


@dataclass(frozen=True)
class TrainingPlan:
    """How an adapter is (re)trained this time, and why (recorded on the adapter)."""

    path: str  # FULL (from scratch, on every training example) or INCREMENTAL
    reason: str
    train_ids: tuple[str, ...]  # the training examples this run trains on
    streak: int = 0  # incremental updates in a row, this one included
    warm_start_version: str | None = None  # the published version an update continues from


def example_fingerprints(dataset: pd.DataFrame) -> dict[str, str]:
    """Training example id -> a hash of its content: what an adapter was trained on."""
    rows = dataset[dataset["split"] == "train"]
    return {
        r.example_id: hashlib.sha256(json.dumps([r.system, r.prompt, r.response, r.rejected]).encode()).hexdigest()[:16]
        for r in rows.itertuples(index=False)
    }


def plan_update(
    mode: Mode, dataset: pd.DataFrame, previous: dict[str, Any] | None, base_revision: str, seed: int = 0
) -> TrainingPlan:
    """Full retrain or incremental update, from what the published adapter was trained on.

    ``previous`` is the published adapter's ``lora_assets.json`` (None when nothing is published).
    """
    current = example_fingerprints(dataset)
    everything = tuple(sorted(current))
    if previous is None:
        return TrainingPlan(FULL, "first training", everything)
    if previous.get("base_model_revision") != base_revision:
        return TrainingPlan(FULL, "the base model changed", everything)
    if previous.get("lora") != _lora_json(mode):
        return TrainingPlan(FULL, "the mode's LoRA settings changed", everything)
    trained = previous.get("trained_examples")
    if not isinstance(trained, dict):
        return TrainingPlan(FULL, "the published adapter does not say what it was trained on", everything)
    deleted = sorted(set(trained) - set(current))
    if deleted:
        return TrainingPlan(FULL, f"{len(deleted)} record(s) it was trained on are gone: retrained without them", everything)
    fresh = sorted(i for i, h in current.items() if trained.get(i) != h)
    change = len(fresh) / max(1, len(current))
    policy = mode.update
    if change > policy.max_change:
        return TrainingPlan(FULL, f"large change: {len(fresh)} of {len(current)} examples new or changed", everything)
    streak = int(previous.get("incremental_streak", 0)) + 1
    if streak > policy.max_streak:
        return TrainingPlan(FULL, f"{policy.max_streak} incremental updates in a row", everything)
    rest = sorted(set(current) - set(fresh))
    replay = random.Random(f"{seed}:{len(current)}").sample(rest, min(len(rest), max(policy.min_replay, round(policy.replay * len(fresh)))))
    return TrainingPlan(
        INCREMENTAL, f"{len(fresh)} of {len(current)} examples new or changed, {len(replay)} replayed",
        tuple(sorted(fresh + replay)), streak, previous.get("version"),
    )


def _lora_json(mode: Mode) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(mode.lora)))


def validation_slice(mode: Mode, train: list[Any]) -> tuple[list[Any], list[Any]]:
    """(train, validation): the mode budget's share of the training examples set aside to choose
    the step, picked by hashing ids (stable across rebuilds, independent of the eval split).
    No slice when it would hold fewer than ``min_validation`` examples, or for a user with
    ``validate_below`` training examples or more (the epochs formula decides)."""
    budget = mode.budget
    n = min(budget.max_validation, round(budget.validation_fraction * len(train)))
    if n < budget.min_validation or not budget.validates(len(train)):
        return train, []
    ranked = sorted(train, key=lambda e: hashlib.sha256(f"{mode.name}:validation:{e.id}".encode()).digest())
    chosen = {e.id for e in ranked[:n]}
    return [e for e in train if e.id not in chosen], [e for e in train if e.id in chosen]


def job_for(
    mode: Mode,
    user: str,
    dataset: pd.DataFrame,
    output_dir: Path,
    steps: int | None = None,
    step_ceiling: int | None = None,
    warm_start_from: Path | None = None,
    metadata: dict[str, Any] | None = None,
    plan: TrainingPlan | None = None,
    gguf_type: str = TrainJob.gguf_type,
    peft_dtype: str = TrainJob.peft_dtype,
) -> TrainJob:
    """A training job for ``user``'s adapter of ``mode`` from that mode's dataset table.

    Without a ``plan``: a full training on every training example. ``steps`` fixes the step
    budget (tests, benchmarks); ``step_ceiling`` caps the mode's (a deployment's cost ceiling per
    adapter, ``Settings.max_train_steps``). Otherwise a full training sets aside a validation slice that
    chooses the step (early stopping within the mode's budget) at the mode's rate for that many
    examples, or from the budget's ``validate_below`` examples on trains the epochs formula at the
    rate's maximum, and an incremental update trains for its update budget at its rate.
    """
    rows = pairs_from if mode.objective.pairwise else examples_from
    train = everything = rows(dataset, "train")
    plan = plan or TrainingPlan(FULL, "full training", tuple(e.id for e in train))
    validation: list[Any] = []
    if plan.path == INCREMENTAL:
        chosen = set(plan.train_ids)
        train = [e for e in train if e.id in chosen]
    elif steps is None:
        train, validation = validation_slice(mode, train)
    # A user with enough examples to skip validation: the epochs formula at the rate's maximum.
    formula = plan.path != INCREMENTAL and steps is None and not mode.budget.validates(len(train))
    return TrainJob(
        name=f"{user}/{mode.name}",
        train=train,
        eval=rows(dataset, "eval"),
        validation=validation,
        retrievable=everything,
        objective=mode.objective,
        output_dir=Path(output_dir),
        lora=mode.lora,
        max_steps=steps,
        budget=(mode.update.budget if plan.path == INCREMENTAL else mode.budget).capped(step_ceiling),
        learning_rate=(mode.update.learning_rate if plan.path == INCREMENTAL
                       else mode.learning_rate.maximum if formula else mode.learning_rate.for_examples(len(train))),
        seed=0,
        warm_start_from=warm_start_from,
        gguf_type=gguf_type,
        peft_dtype=peft_dtype,
        metadata={
            "user": user,
            "mode": mode.name,
            "training": plan.path,
            "training_reason": plan.reason,
            "incremental_streak": plan.streak,
            "warm_start_version": plan.warm_start_version,
            # A refit (``StepBudget.refit``) trains the kept adapter on the slice's examples too.
            "examples_trained": len(train) + (len(validation) if mode.budget.refit else 0),
            "validation_examples": len(validation),
            "trained_examples": example_fingerprints(dataset),
            **(metadata or {}),
        },
    )
