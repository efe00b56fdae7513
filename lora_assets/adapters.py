"""Glue from a mode's dataset to a training job, and where adapters live. No dagster here.

The CLI and the Dagster assets both train through ``jobs_for``/``train_adapters`` so there is
one path from a dataset table to an adapter folder.
"""

from __future__ import annotations

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


def job_for(
    mode: Mode,
    user: str,
    dataset: pd.DataFrame,
    output_dir: Path,
    steps: int | None = None,
    warm_start_from: Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> TrainJob:
    """A training job for ``user``'s adapter of ``mode`` from that mode's dataset table."""
    rows = pairs_from if mode.objective.pairwise else examples_from
    return TrainJob(
        name=f"{user}/{mode.name}",
        train=rows(dataset, "train"),
        eval=rows(dataset, "eval"),
        objective=mode.objective,
        output_dir=Path(output_dir),
        lora=mode.lora,
        max_steps=steps if steps is not None else mode.train_steps,
        seed=0,
        warm_start_from=warm_start_from,
        metadata={"user": user, "mode": mode.name, **(metadata or {})},
    )
