"""Failed batch runs: which work they did not finish, for the sensors to request again.

A run the daemon will retry (``run_retries`` in dagster.yaml, for a crashed, killed or hung worker)
is left to that retry; whether it will is decided as the daemon decides it (``should_retry``, which
also records the verdict on the run), so a sensor tick that sees the failure first does not
retry it a second time. Otherwise what the run reported as permanent (bad data, a failed gate) is
not retried, and what it finished is read from the state table (rows written with its run id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dagster import DagsterEventType, DagsterInstance, DagsterRun

from lora_assets.orchestration.internals import should_retry
from lora_assets.orchestration.keys import (
    ATTEMPT_TAG,
    PERMANENT_FAILURES,
    RETRY_OF_TAG,
    RETRY_REASON_TAG,
    TRIGGER_TAG,
)

FAILURES_PER_TICK = 100  # failed runs reconciled per tick


@dataclass(frozen=True)
class FailedBatch:
    run: DagsterRun
    permanent: frozenset[str]  # what the run reported as failures that will not go away
    attempt: int
    reason: str  # why it failed, in one line

    def retry_tags(self) -> dict[str, str]:
        """The tags of the run that redoes this one's lost work."""
        return {TRIGGER_TAG: "retry", ATTEMPT_TAG: str(self.attempt + 1), RETRY_OF_TAG: self.run.run_id,
                RETRY_REASON_TAG: self.reason}


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
        if run is None or run.job_name != job_name or should_retry(run, instance):
            continue
        permanent: list[str] = []
        for entry in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE):
            failure = entry.dagster_event.step_failure_data.user_failure_data
            if failure is not None and PERMANENT_FAILURES in failure.metadata:
                permanent.extend(json.loads(failure.metadata[PERMANENT_FAILURES].value))
        out.append(FailedBatch(run, frozenset(permanent), int(run.tags.get(ATTEMPT_TAG, "1")),
                               failure_reason(instance, run.run_id)))
    return out, records.cursor if records.records else cursor


def failure_reason(instance: DagsterInstance, run_id: str) -> str:
    """Why a run failed, in one line: its step's error, else why it was stopped (the maximum run
    time), else the run failure's message (a killed worker)."""
    for kind in (DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_CANCELING, DagsterEventType.RUN_FAILURE):
        entries = instance.all_logs(run_id, of_type=kind)
        if not entries:
            continue
        # The last step failure, else why it was stopped (run monitoring: "exceeding maximum
        # runtime"), else the first run failure (a second, generic one may follow).
        event = entries[-1 if kind == DagsterEventType.STEP_FAILURE else 0].dagster_event
        error = event.step_failure_data.error if kind == DagsterEventType.STEP_FAILURE else None
        text = (error.message if error else event.message) or ""
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        if line:
            return line[:200]
    return "unknown"


def label_retry(context) -> None:
    """Tag a run that Dagster's run retries launched (``run_retries``: a killed or hung worker)
    as a retry, with its attempt and the reason, as the sensors tag theirs: the run list, the
    asset's runs and ``lora-assets status`` then say it is a retry, not only a re-execution badge."""
    run = context.run
    if not run.parent_run_id or run.tags.get(RETRY_OF_TAG) == run.parent_run_id:
        return
    parent = context.instance.get_run_by_id(run.parent_run_id)
    attempt = int((parent.tags if parent else {}).get(ATTEMPT_TAG, "1")) + 1
    reason = failure_reason(context.instance, run.parent_run_id)
    context.instance.add_run_tags(run.run_id, {TRIGGER_TAG: "retry", ATTEMPT_TAG: str(attempt),
                                              RETRY_OF_TAG: run.parent_run_id, RETRY_REASON_TAG: reason})
    context.log.info(f"attempt {attempt}: a retry of run {run.parent_run_id}, which failed: {reason}")
