"""``lora-assets prune``: retention for what grows with time, not with users.

The per-adapter history and the log of dataset builds in the state table are pruned after
``history_retention_days``; finished Dagster runs (their event logs included) after the given
number of days. Live runs are never touched, nor the state rows that say what is current.
Run it daily (a cron job, a Kubernetes CronJob, an ECS scheduled task).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dagster import DagsterInstance, RunsFilter

from lora_assets.orchestration.internals import FINISHED_STATUSES

PAGE = 500


@dataclass
class Pruned:
    state_rows: int
    runs: int


def prune(instance: DagsterInstance, settings, runs_older_than_days: float | None) -> Pruned:
    """Drop history older than the settings' retention and, if given, finished runs older than
    ``runs_older_than_days``."""
    rows = settings.state().prune(settings.history_retention_days * 86400)
    deleted = 0
    if runs_older_than_days is not None:
        before = time.time() - runs_older_than_days * 86400
        from datetime import datetime, timezone

        cutoff = datetime.fromtimestamp(before, tz=timezone.utc)
        while True:
            records = instance.get_run_records(
                RunsFilter(statuses=list(FINISHED_STATUSES), created_before=cutoff), limit=PAGE)
            if not records:
                break
            for record in records:
                instance.delete_run(record.dagster_run.run_id)
                deleted += 1
    return Pruned(rows, deleted)
