"""Forgetting a user everywhere (GDPR art. 17): ``lora-assets forget --user U``.

Order matters, so that nothing brings the user's data back:

1. The user is marked forgotten (the instance's key-value store). From then on the change
   sensor drops their change events, the adapter sensor requests nothing for them, and batch
   runs skip them before writing anything (datasets, adapters, drive).
2. Runs in flight that list the user are waited for (they skip the user at their next check),
   and terminated when they take longer than ``wait_s``.
3. The data is erased: user store, datasets, drive, working copies, feed (``lora_assets.erasure``).
4. The Dagster records that name the user are erased: runs that concerned only the user are
   deleted whole; from runs shared with other users, the log lines naming the user. Which runs
   concerned the user is read from their state-table rows (run ids) before those rows go, so no
   scan of the event log is needed. Dagster's asset events hold no user id (per-run summaries).
5. Everything is checked again; a straggler's write is erased too.

What remains is listed in the README (Privacy): the user id in the config of batch runs shared
with other users, compute logs, and backups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as db
from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from lora_assets.data.user_store import validate_user_id
from lora_assets.erasure import Erased, erase_user_data, remaining_user_data
from lora_assets.orchestration.batches import batch_users
from lora_assets.orchestration.internals import NOT_FINISHED_STATUSES, SqlEventLogStorageTable
from lora_assets.orchestration.keys import USERS_TAG
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
    run_ids = settings.state().run_ids_of(user) | set(in_flight)  # before erase_user_data drops the rows
    erased = erase_user_data(settings, user)
    erase_dagster_records(instance, user, erased, run_ids)
    for _ in range(3):  # a run that was mid-write when the user was marked: erase what it wrote
        time.sleep(1)
        remaining = remaining_user_data(settings, user) + _remaining_records(instance, user, run_ids)
        if not remaining:
            break
        run_ids |= settings.state().run_ids_of(user)
        erase_user_data(settings, user, erased)
        erase_dagster_records(instance, user, erased, run_ids)
    else:
        remaining = remaining_user_data(settings, user) + _remaining_records(instance, user, run_ids)
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


def _log_markers(user: str) -> list[str]:
    """How our run log lines name a user (``[base|user/mode]``, ``user: ...``, ``mode/user: ...``)."""
    return [f"|{user}/", f"[{user}/", f" {user}: ", f'"{user}: ', f"/{user}: "]


def _like(marker: str) -> str:
    escaped = marker.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def erase_dagster_records(instance: DagsterInstance, user: str, erased: Erased, run_ids: set[str]) -> None:
    """Delete the runs that were only the user's and, from the runs they shared, the log lines
    naming them."""
    # Batch runs of this user alone, even those stopped before they recorded anything.
    run_ids = set(run_ids) | {r.run_id for r in instance.get_runs(RunsFilter(tags={USERS_TAG: user}))}
    deleted_runs = events = 0
    for run_id in sorted(r for r in run_ids if r):
        run = instance.get_run_by_id(run_id)
        if run is not None and _only_user(run, user):
            instance.delete_run(run_id)
            deleted_runs += 1
            continue
        events += _delete_rows(instance.event_log_storage, run_id, user)
        if run is not None and user in run.tags.get(USERS_TAG, "").split(","):
            users = [u for u in run.tags[USERS_TAG].split(",") if u != user]
            instance.add_run_tags(run_id, {USERS_TAG: ",".join(users)})
    erased.add("runs (only this user's)", deleted_runs)
    erased.add("log lines of shared runs", events)


def _only_user(run: DagsterRun, user: str) -> bool:
    users = batch_users(run)
    return users == {user} if users is not None else _lists_user(run, user)


def _names_user(event: str, user: str) -> bool:
    """Exactly, case-sensitively: SQL LIKE only preselects."""
    return any(m in event for m in _log_markers(user))


def _naming(user: str):
    E = SqlEventLogStorageTable
    mentions = db.or_(*(E.c.event.like(_like(m), escape="\\") for m in _log_markers(user)))
    return db.and_(E.c.dagster_event_type.is_(None), mentions)


def _delete_rows(storage, run_id: str, user: str) -> int:
    """The log lines of one run naming the user (exact, case-sensitive: SQL LIKE only preselects),
    from the run's shard and the index. Failure events are kept: they carry the other users'
    permanent failures, which the sensors read."""
    E = SqlEventLogStorageTable
    condition = db.and_(E.c.run_id == run_id, _naming(user))
    total = 0
    for connection in (storage.index_connection(), storage.run_connection(run_id)):
        with connection as conn:
            rows = conn.execute(db.select(E.c.id, E.c.event).where(condition))
            ids = [i for i, event in rows if _names_user(event, user)]
            for start in range(0, len(ids), 500):
                total += conn.execute(E.delete().where(E.c.id.in_(ids[start : start + 500]))).rowcount
    return total


def _remaining_records(instance: DagsterInstance, user: str, run_ids: set[str]) -> list[str]:
    E = SqlEventLogStorageTable
    if not run_ids:
        return []
    with instance.event_log_storage.index_connection() as conn:
        rows = conn.execute(db.select(E.c.event).where(db.and_(E.c.run_id.in_(sorted(run_ids)), _naming(user))))
        n = sum(_names_user(event, user) for (event,) in rows)
    return [f"{n} event-log lines naming the user"] if n else []
