"""Failed batch runs: which work they did not finish, for the sensors to request again.

A run the daemon will retry (``run_retries`` in dagster.yaml, for a crashed or killed worker) is
left to that retry. Otherwise what the run reported as permanent (bad data, a failed gate) is
not retried, and what it finished is read from the state table (rows written with its run id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dagster import DagsterEventType, DagsterInstance
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.tags import WILL_RETRY_TAG

from lora_assets.orchestration.batches import PERMANENT_FAILURES

FAILURES_PER_TICK = 100  # failed runs reconciled per tick
ATTEMPT_TAG = "lora_assets/attempt"


@dataclass(frozen=True)
class FailedBatch:
    run: DagsterRun
    permanent: frozenset[str]  # what the run reported as failures that will not go away
    attempt: int


def failed_batches(
    instance: DagsterInstance, job_name: str, cursor: str | None
) -> tuple[list[FailedBatch], str | None]:
    """Batch runs of ``job_name`` that failed after ``cursor`` and that no retry will redo.

    The cursor is a position in the event log's run-failure events; a new sensor starts at the
    newest one, so only failures from then on are reconciled.
    """
    if cursor is None:
        latest = instance.fetch_run_status_changes(DagsterEventType.RUN_FAILURE, limit=1, ascending=False)
        return [], latest.cursor if latest.records else ""
    records = instance.fetch_run_status_changes(
        DagsterEventType.RUN_FAILURE, limit=FAILURES_PER_TICK, cursor=cursor or None, ascending=True
    )
    out = []
    for record in records.records:
        run = instance.get_run_by_id(record.run_id)
        if run is None or run.job_name != job_name or run.tags.get(WILL_RETRY_TAG) == "true":
            continue
        permanent: list[str] = []
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE):
            failure = entry.dagster_event.step_failure_data.user_failure_data
            if failure is not None and PERMANENT_FAILURES in failure.metadata:
                permanent.extend(json.loads(failure.metadata[PERMANENT_FAILURES].value))
        out.append(FailedBatch(run, frozenset(permanent), int(run.tags.get(ATTEMPT_TAG, "1"))))
    return out, records.cursor if records.records else cursor
