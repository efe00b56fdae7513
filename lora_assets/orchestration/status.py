"""Who is fresh: per base model x user x mode, the dataset, the adapter, its gate and what is
published, and whether the adapter is current with the data (``lora-assets status``).

Everything comes from indexed reads of the Dagster instance: the latest materialization per
partition (two queries per asset and page of users), the latest gate verdict per partition, the
live adapter runs (bounded by the queue) and the latest failed runs (bounded). Asking for one
user costs the same with 1,000 or 1,000,000 registered users.

The JSON form (``--json``) is a stable interface, ``STATUS_SCHEMA`` version 1: keys are only ever
added, never renamed or removed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dagster import AssetCheckKey, DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES
from dagster._core.storage.event_log.base import PartitionKeyFilter

from lora_assets.modes import MODES
from lora_assets.orchestration.assets import GATE_CHECK, adapter_key, dataset_key, published_key
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, batch_users
from lora_assets.orchestration.partitions import adapter_partition_key, users_partitions
from lora_assets.orchestration.recording import latest_materializations
from lora_assets.orchestration.registry import active_base_models

STATUS_SCHEMA = 1
PAGE = 256  # users per page of indexed reads
FAILED_RUNS_SCANNED = 200  # the newest failed batch runs searched for a user's last failure

# States, from best to worst.
FRESH = "fresh"  # the published adapter was trained on the current dataset
UPDATING = "updating"  # a run in flight trains it on the current dataset
STALE = "stale"  # the data changed (or training or the gate failed) and nothing is on the way yet
NO_DATA = "no_data"  # no training example: nothing to learn, nothing published
WITHDRAWN = "withdrawn"  # its data was deleted: the adapter was removed from the drive


@dataclass
class Gate:
    passed: bool
    reason: str
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    published_eval_loss: float | None
    at: float


@dataclass
class AdapterStatus:
    base_model: str
    user: str
    mode: str
    state: str
    why: str
    dataset_version: str | None = None
    train_rows: int | None = None
    trained_on: str | None = None  # the dataset version the latest adapter was trained on
    adapter_version: str | None = None
    adapter_at: float | None = None
    published_version: str | None = None
    published_at: float | None = None
    gate: Gate | None = None
    run_in_flight: str | None = None
    last_failure: dict[str, Any] | None = None


@dataclass
class StatusReport:
    adapters: list[AdapterStatus]
    pending_events: int | None
    dead_letters: int | None
    live_runs: int
    generated_at: float = field(default_factory=time.time)

    def totals(self) -> dict[str, int]:
        out = {s: 0 for s in (FRESH, UPDATING, STALE, NO_DATA, WITHDRAWN)}
        for a in self.adapters:
            out[a.state] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATUS_SCHEMA,
            "generated_at": self.generated_at,
            "feed": {"pending_events": self.pending_events, "dead_letters": self.dead_letters},
            "live_adapter_runs": self.live_runs,
            "totals": self.totals(),
            "adapters": [asdict(a) for a in self.adapters],
        }


def _value(materialization, name: str) -> Any:
    entry = materialization.metadata.get(name)
    return entry.value if entry is not None else None


def _latest_gate(instance: DagsterInstance, mode: str, partition: str) -> Gate | None:
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(adapter_key(mode), GATE_CHECK), limit=1, partition_filter=PartitionKeyFilter(key=partition),
        status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
    )
    for record in history:  # planned ones (in flight, or never evaluated) are skipped by the query
            evaluation = record.event.dagster_event.event_specific_data
            meta = {k: v.value for k, v in evaluation.metadata.items()}
            return Gate(evaluation.passed, str(meta.get("reason", "")), meta.get("base_eval_loss"),
                        meta.get("adapter_eval_loss"), meta.get("published_eval_loss"), record.event.timestamp)
    return None


def _failures(instance: DagsterInstance, users: set[str]) -> dict[str, dict[str, Any]]:
    """user -> their newest failed batch run among the newest failed ones (run id, job, time, error)."""
    out: dict[str, dict[str, Any]] = {}
    runs = instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE], job_name=None), limit=FAILED_RUNS_SCANNED
    )
    for record in runs:
        run = record.dagster_run
        listed = (batch_users(run) or set()) & users
        if not listed - set(out):
            continue
        failures = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
        error = failures[-1].dagster_event.step_failure_data.error if failures else None
        message = (error.message.strip().splitlines() or [""])[0][:300] if error else ""
        for user in listed - set(out):
            out[user] = {"run_id": run.run_id, "job": run.job_name,
                         "at": record.end_time or record.update_timestamp.timestamp(), "error": message}
    return out


def live_adapter_runs(instance: DagsterInstance) -> dict[tuple[str, str, str], str]:
    """(base model, user, mode) -> the live adapter run training it (bounded by the queue)."""
    flying: dict[tuple[str, str, str], str] = {}
    for run in instance.get_runs(RunsFilter(job_name=ADAPTER_BATCH_JOB, statuses=list(NOT_FINISHED_STATUSES))):
        config = run.run_config["ops"]["train_adapters"]["config"]
        for item in config["items"]:
            flying[(config["base_model"], item["user"], item["mode"])] = run.run_id
    return flying


def adapter_status(
    instance: DagsterInstance,
    users: Sequence[str],
    modes: Sequence[str],
    bases: Sequence[str],
    flying_runs: dict[tuple[str, str, str], str],
    failures: bool = True,
) -> list[AdapterStatus]:
    """The status of each (base model, user, mode), users in the given order."""
    failed = _failures(instance, set(users)) if failures else {}
    rows: list[AdapterStatus] = []
    for mode in modes:
        datasets = latest_materializations(instance, dataset_key(mode), users)
        for base in bases:
            partitions = {str(adapter_partition_key(base, u)): u for u in users}
            adapters = latest_materializations(instance, adapter_key(mode), list(partitions))
            published = latest_materializations(instance, published_key(mode), list(partitions))
            for partition, user in partitions.items():
                rows.append(_row(instance, base, user, mode, partition, datasets.get(user), adapters.get(partition),
                                 published.get(partition), flying_runs.get((base, user, mode)), failed.get(user)))
    order = {u: i for i, u in enumerate(users)}
    rows.sort(key=lambda r: (order[r.user], r.base_model, r.mode))
    return rows


def _row(instance, base, user, mode, partition, dataset, adapter, published, run_id, failure) -> AdapterStatus:
    row = AdapterStatus(base, user, mode, STALE, "", run_in_flight=run_id, last_failure=failure)
    if dataset is not None:
        row.dataset_version = dataset.asset_materialization.tags.get("dagster/data_version")
        row.train_rows = _value(dataset.asset_materialization, "train_rows")
    if adapter is not None:
        mat = adapter.asset_materialization
        row.trained_on = _value(mat, "dataset_version")
        row.adapter_version = None if _value(mat, "withdrawn") else mat.tags.get("dagster/data_version")
        row.adapter_at = adapter.timestamp
    if published is not None:
        version = _value(published.asset_materialization, "version")
        row.published_version = None if version == "withdrawn" else version
        row.published_at = published.timestamp
    if adapter is not None and row.adapter_version:
        row.gate = _latest_gate(instance, mode, partition)

    withdrawn_last = published is not None and row.published_version is None and (
        adapter is None or row.adapter_version is None or published.storage_id > adapter.storage_id
    )
    if withdrawn_last:
        row.state, row.why = WITHDRAWN, "its data was deleted; the adapter was removed from the drive"
        if dataset is not None and row.train_rows and row.trained_on != row.dataset_version:
            row.state, row.why = STALE, "withdrawn earlier; new data since"
    elif dataset is None:
        row.state, row.why = NO_DATA, "no dataset built yet"
    elif not row.train_rows and adapter is None:
        row.state, row.why = NO_DATA, "the dataset has no training example"
    elif adapter is None:
        row.why = "never trained"
    elif row.trained_on != row.dataset_version:
        row.why = f"dataset changed since training (now {row.dataset_version}, trained on {row.trained_on})"
    elif row.gate is not None and not row.gate.passed:
        row.why = f"eval gate failed: {row.gate.reason}; devices keep {row.published_version or 'nothing'}"
    elif published is None or published.storage_id < adapter.storage_id:
        row.why = "trained and gated, not published yet"
    else:
        row.state, row.why = FRESH, "published adapter trained on the current dataset"
    if row.state == STALE and run_id:
        row.state, row.why = UPDATING, f"{row.why}; run {run_id} is training it"
    return row


def iter_users(instance: DagsterInstance, user: str | None) -> Iterator[list[str]]:
    """Pages of registered users (just ``user`` when given)."""
    if user is not None:
        yield [user]
        return
    users = instance.get_dynamic_partitions(users_partitions.name)
    for start in range(0, len(users), PAGE):
        yield users[start : start + PAGE]


def status(
    instance: DagsterInstance,
    feed=None,
    user: str | None = None,
    mode: str | None = None,
    base_model: str | None = None,
) -> StatusReport:
    """The report ``lora-assets status`` prints; ``feed`` (optional) adds pending events and dead letters."""
    modes = [mode] if mode else list(MODES)
    bases = [base_model] if base_model else active_base_models(instance)
    flying = live_adapter_runs(instance)  # read once for every page
    rows: list[AdapterStatus] = []
    for page in iter_users(instance, user):
        rows.extend(adapter_status(instance, page, modes, bases, flying, failures=user is not None))
    pending = feed.pending_count() if feed is not None else None
    dead = len(feed.dead_letters()) if feed is not None else None
    return StatusReport(rows, pending, dead, len(set(flying.values())))
