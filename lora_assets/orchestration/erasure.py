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
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, DATASET_BATCH_JOB, USERS_TAG
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
    for _ in range(3):  # a run that was mid-write when it was stopped: erase what it wrote
        remaining = remaining_user_data(settings, user) + _remaining_records(instance, user)
        if not remaining:
            break
        erase_user_data(settings, user, erased)
        erase_dagster_records(instance, user, erased)
    return ForgetReport(user, erased, in_flight, terminated, remaining)


def _lists_user(run: DagsterRun, user: str) -> bool:
    if run.job_name in (DATASET_BATCH_JOB, ADAPTER_BATCH_JOB):
        ops = run.run_config.get("ops", {})
        entries = ops.get("rebuild_datasets", ops.get("train_adapters", {})).get("config", {})
        return any(e.get("user") == user for e in entries.get("users", entries.get("items", [])))
    partition = run.tags.get("dagster/partition", "")
    return partition == user or partition.endswith(f"|{user}") or run.tags.get("dagster/partition/user") == user


def _live_runs_listing(instance: DagsterInstance, user: str) -> list[DagsterRun]:
    live = instance.get_runs(RunsFilter(statuses=list(NOT_FINISHED_STATUSES)))
    return [r for r in live if _lists_user(r, user)]


def _wait_or_terminate(instance: DagsterInstance, user: str, wait_s: float) -> list[str]:
    deadline = time.monotonic() + wait_s
    while _live_runs_listing(instance, user) and time.monotonic() < deadline:
        time.sleep(1)
    stuck = _live_runs_listing(instance, user)
    for run in stuck:
        if run.status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED):
            instance.report_run_canceled(run, message=f"canceled: its user {user} was forgotten")
        else:
            instance.run_launcher.terminate(run.run_id)
    deadline = time.monotonic() + 60
    while _live_runs_listing(instance, user) and time.monotonic() < deadline:
        time.sleep(1)
    for run in _live_runs_listing(instance, user):  # the launcher could not stop it: mark it
        instance.report_run_canceled(run, message=f"canceled: its user {user} was forgotten")
    return [r.run_id for r in stuck]


def _partitions(instance: DagsterInstance, user: str) -> list[str]:
    bases = instance.get_dynamic_partitions(base_model_partitions.name)
    return [user, *(f"{b}|{user}" for b in bases)]


def _log_patterns(user: str) -> list[str]:
    """How our run logs name a user (``[base|user/mode]``, ``user: ...``, ``mode/user: ...``)."""
    return [f"%|{user}/%", f"%[{user}/%", f"% {user}: %", f'%"{user}: %', f"%/{user}: %"]


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
    if run.job_name in (DATASET_BATCH_JOB, ADAPTER_BATCH_JOB):
        ops = run.run_config.get("ops", {})
        entries = ops.get("rebuild_datasets", ops.get("train_adapters", {})).get("config", {})
        users = {e.get("user") for e in entries.get("users", entries.get("items", []))}
        return users == {user}
    return _lists_user(run, user)


def _delete_rows(storage, run_id: str, partitions: list[str], user: str) -> int:
    """The user's asset events and log lines in one run, from the run's shard and the index."""
    E, T = SqlEventLogStorageTable, AssetEventTagsTable
    mentions = db.or_(*(E.c.event.like(p) for p in _log_patterns(user)))
    condition = db.and_(E.c.run_id == run_id, db.or_(E.c.partition.in_(partitions), db.and_(E.c.partition.is_(None), mentions)))
    total = 0
    connections = [storage.index_connection()]
    if run_id:
        connections.append(storage.run_connection(run_id))
    for connection in connections:
        with connection as conn:
            ids = [r[0] for r in conn.execute(db.select(E.c.id).where(condition))]
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
