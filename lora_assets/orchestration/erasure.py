"""Forgetting a user everywhere (GDPR art. 17): ``lora-assets forget --user U``.

Order matters, so that nothing brings the user's data back:

1. The user is marked forgotten (the instance's key-value store). From then on the change
   sensor drops their change events, the adapter sensor requests nothing for them, and batch
   runs skip them before writing anything (datasets, adapters, drive).
2. Runs in flight that list the user are waited for (they skip the user at their next check),
   and terminated when they take longer than ``wait_s``.
3. The data is erased: user store, datasets, drive, working copies, feed (``lora_assets.erasure``).
4. The Dagster records of the user's partitions are erased: runs that concerned only the user
   are deleted whole; from runs shared with other users, the user's materializations (metadata
   and previews), planned and check-evaluation events, and the log lines naming the user; the
   asset caches that could still hold them; the ``users`` partition itself.
5. Everything is checked again; a straggler's write is erased too.

What remains is listed in the README (Privacy): the user id in the config of batch runs shared
with other users, compute logs, and backups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as db
from dagster import DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES, DagsterRun
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    AssetEventTagsTable,
    AssetKeyTable,
    SqlEventLogStorageTable,
)

from lora_assets.data.user_store import validate_user_id
from lora_assets.erasure import Erased, erase_user_data, remaining_user_data
from lora_assets.orchestration.batches import USERS_TAG, batch_users
from lora_assets.orchestration.partitions import base_model_partitions, users_partitions
from lora_assets.orchestration.registry import mark_forgotten
from lora_assets.settings import Settings

@dataclass
class ForgetReport:
    user: str
    erased: Erased
    waited_for: list[str]  # runs in flight that listed the user
    terminated: list[str]
    remaining: list[str]  # what could not be erased (empty on success)


def forget_user(instance: DagsterInstance, settings: Settings, user: str, wait_s: float = 120.0) -> ForgetReport:
    """Erase every trace of ``user`` this deployment holds; idempotent, safe while the daemon runs."""
    validate_user_id(user)
    mark_forgotten(instance, user)
    in_flight = [r.run_id for r in _live_runs_listing(instance, user)]
    terminated = _wait_or_terminate(instance, user, wait_s)
    erased = erase_user_data(settings, user)
    erase_dagster_records(instance, user, erased)
    for _ in range(3):  # a run that was mid-write when the user was marked: erase what it wrote
        time.sleep(1)
        remaining = remaining_user_data(settings, user) + _remaining_records(instance, user)
        if not remaining:
            break
        erase_user_data(settings, user, erased)
        erase_dagster_records(instance, user, erased)
    else:
        remaining = remaining_user_data(settings, user) + _remaining_records(instance, user)
    return ForgetReport(user, erased, in_flight, terminated, remaining)


def _lists_user(run: DagsterRun, user: str) -> bool:
    users = batch_users(run)
    if users is not None:
        return user in users
    partition = run.tags.get("dagster/partition", "")
    return partition == user or partition.endswith(f"|{user}") or run.tags.get("dagster/partition/user") == user


def _live_runs_listing(instance: DagsterInstance, user: str) -> list[DagsterRun]:
    live = instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)))
    return [r for r in live if _lists_user(r, user)]


def _wait_or_terminate(instance: DagsterInstance, user: str, wait_s: float) -> list[str]:
    """Let runs listing the user finish; stop only the ones that work for this user alone.

    Runs shared with other users are never stopped: they skip a forgotten user before every
    write, and stopping them would lose the other users' work. A queued run of this user alone
    is canceled; a started one is terminated after ``wait_s``.
    """
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(
        r.status not in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED) or _only_user(r, user)
        for r in _live_runs_listing(instance, user)
    ):
        time.sleep(1)
    stopped = []
    for run in _live_runs_listing(instance, user):
        if not _only_user(run, user):
            continue
        if run.status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED):
            instance.report_run_canceled(run, message=f"canceled: its user {user} was forgotten")
        else:
            instance.run_launcher.terminate(run.run_id)
        stopped.append(run.run_id)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(r.run_id in stopped for r in _live_runs_listing(instance, user)):
        time.sleep(1)
    for run in _live_runs_listing(instance, user):  # the launcher could not stop it: mark it
        if run.run_id in stopped:
            instance.report_run_canceled(run, message=f"canceled: its user {user} was forgotten")
    return stopped


def _partitions(instance: DagsterInstance, user: str) -> list[str]:
    bases = instance.get_dynamic_partitions(base_model_partitions.name)
    return [user, *(f"{b}|{user}" for b in bases)]


def _log_markers(user: str) -> list[str]:
    """How our run log lines name a user (``[base|user/mode]``, ``user: ...``, ``mode/user: ...``)."""
    return [f"|{user}/", f"[{user}/", f" {user}: ", f'"{user}: ', f"/{user}: "]


def _like(marker: str) -> str:
    escaped = marker.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


CHECK_EVENTS = ("ASSET_CHECK_EVALUATION", "ASSET_CHECK_EVALUATION_PLANNED")


def _concerns_user(event: str, event_type: str | None, partitions: list[str], user: str) -> bool:
    """Whether a partition-less event row is about the user: a log line naming them (exact,
    case-sensitive: SQL LIKE only preselects), or a gate check event on one of their partitions."""
    if event_type is None:
        return any(m in event for m in _log_markers(user))
    from dagster import AssetCheckEvaluation, EventLogEntry
    from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluationPlanned
    from dagster._serdes import deserialize_value

    data = deserialize_value(event, EventLogEntry).dagster_event.event_specific_data
    if isinstance(data, AssetCheckEvaluation):
        return data.partition in partitions
    if isinstance(data, AssetCheckEvaluationPlanned) and data.partitions_subset is not None:
        return any(p in partitions for p in data.partitions_subset.get_partition_keys())
    return False


def erase_dagster_records(instance: DagsterInstance, user: str, erased: Erased) -> None:
    """Delete the user's partitions' records from the event log (and runs that were only theirs)."""
    storage = instance.event_log_storage
    partitions = _partitions(instance, user)
    E, C = SqlEventLogStorageTable, AssetCheckExecutionsTable
    with storage.index_connection() as conn:
        run_ids = {r[0] for r in conn.execute(db.select(E.c.run_id).where(E.c.partition.in_(partitions)).distinct())}
        run_ids |= {r[0] for r in conn.execute(db.select(C.c.run_id).where(C.c.partition.in_(partitions)).distinct())}
        keys = {r[0] for r in conn.execute(db.select(E.c.asset_key).where(E.c.partition.in_(partitions)).distinct())}
    for partition in partitions:  # one-partition asset runs (their planned events carry no partition)
        for tag in ("dagster/partition", "dagster/partition/user"):
            run_ids |= {r.run_id for r in instance.get_runs(RunsFilter(tags={tag: partition}))}
    # Batch runs of this user alone, even those stopped before they recorded anything.
    run_ids |= {r.run_id for r in instance.get_runs(RunsFilter(tags={USERS_TAG: user}))}
    deleted_runs = events = checks = 0
    for run_id in sorted(run_ids):
        run = instance.get_run_by_id(run_id) if run_id else None
        if run is not None and _only_user(run, user):
            instance.delete_run(run_id)
            with storage.index_connection() as conn:
                conn.execute(C.delete().where(C.c.run_id == run_id))
            deleted_runs += 1
            continue
        events += _delete_rows(storage, run_id, partitions, user)
        with storage.index_connection() as conn:
            checks += conn.execute(C.delete().where(db.and_(C.c.run_id == run_id, C.c.partition.in_(partitions)))).rowcount
        if run is not None and user in run.tags.get(USERS_TAG, "").split(","):
            users = [u for u in run.tags[USERS_TAG].split(",") if u != user]
            instance.add_run_tags(run_id, {USERS_TAG: ",".join(users)})
    _refresh_asset_caches(instance, keys)
    if instance.has_dynamic_partition(users_partitions.name, user):
        instance.delete_dynamic_partition(users_partitions.name, user)
        erased.add("users partition", 1)
    erased.add("runs (only this user's)", deleted_runs)
    erased.add("events of shared runs (materializations, plans, logs)", events)
    erased.add("check evaluations of shared runs", checks)


def _only_user(run: DagsterRun, user: str) -> bool:
    users = batch_users(run)
    return users == {user} if users is not None else _lists_user(run, user)


def _delete_rows(storage, run_id: str, partitions: list[str], user: str) -> int:
    """The user's events in one run, from the run's shard and the index: events of their
    partitions, gate check events on them, and log lines naming them. Failure events are kept:
    they carry the other users' permanent failures, which the sensors read."""
    E, T = SqlEventLogStorageTable, AssetEventTagsTable
    mentions = db.or_(*(E.c.event.like(_like(m), escape="\\") for m in _log_markers(user)))
    partitionless = db.and_(
        E.c.partition.is_(None),
        db.or_(db.and_(E.c.dagster_event_type.is_(None), mentions), E.c.dagster_event_type.in_(CHECK_EVENTS)),
    )
    condition = db.and_(E.c.run_id == run_id, db.or_(E.c.partition.in_(partitions), partitionless))
    total = 0
    connections = [storage.index_connection()]
    if run_id:
        connections.append(storage.run_connection(run_id))
    for connection in connections:
        with connection as conn:
            rows = conn.execute(db.select(E.c.id, E.c.partition, E.c.dagster_event_type, E.c.event).where(condition))
            ids = [i for i, partition, kind, event in rows
                   if partition is not None or _concerns_user(event, kind, partitions, user)]
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                try:
                    conn.execute(T.delete().where(T.c.event_id.in_(chunk)))
                except db.exc.OperationalError:
                    pass  # a run shard has no tag table
                total += conn.execute(E.delete().where(E.c.id.in_(chunk))).rowcount
    return total


def _refresh_asset_caches(instance: DagsterInstance, keys: set[str]) -> None:
    """Point each asset's cached latest materialization at what remains; drop status caches."""
    from dagster import AssetKey

    storage = instance.event_log_storage
    E, K = SqlEventLogStorageTable, AssetKeyTable
    with storage.index_connection() as conn:
        for key in keys:
            latest = conn.execute(
                db.select(E.c.event, E.c.run_id, E.c.timestamp)
                .where(db.and_(E.c.asset_key == key, E.c.dagster_event_type == "ASSET_MATERIALIZATION"))
                .order_by(E.c.id.desc()).limit(1)
            ).first()
            conn.execute(
                K.update().where(K.c.asset_key == key).values(
                    last_materialization=latest[0] if latest else None,
                    last_run_id=latest[1] if latest else None,
                    last_materialization_timestamp=latest[2] if latest else None,
                )
            )
    instance.wipe_asset_cached_status([AssetKey.from_db_string(k) for k in keys])


def _remaining_records(instance: DagsterInstance, user: str) -> list[str]:
    E = SqlEventLogStorageTable
    partitions = _partitions(instance, user)  # before the connection: SQLite storage holds a lock for it
    with instance.event_log_storage.index_connection() as conn:
        n = conn.execute(db.select(db.func.count()).select_from(E).where(E.c.partition.in_(partitions))).scalar()
    left = [f"{n} event-log records"] if n else []
    if instance.has_dynamic_partition(users_partitions.name, user):
        left.append("users partition")
    return left
