"""Every operator operation at N users: the UI's GraphQL, status, backfill planning, sensor ticks.

Builds a deployment at ``--users`` N by writing the rows the product writes: a real batch of
``--template-users`` tiny-llama users goes through ``dataset_batch`` and ``adapter_batch`` (the
sensors' jobs), then its state-table rows are copied for N user ids, and its two runs (run row,
tags, event-log rows, check executions) for N / template runs, as if every user had changed
once (one day of a daily-changing deployment; with the retention in README: Scale, at most
``retention`` days of them are kept). Then times, in one process:

- the UI: the asset graph, an adapter asset's page (latest materialization, partition stats,
  checks), its partition health, its checks tab, the run list, through the webserver's GraphQL;
- ``lora-assets status`` for one user, for one mode (counts by state and the first page) and
  for the stale ones of a mode;
- one page of backfill planning for a new base model;
- both sensors' ticks with 32 changed users pending.

    python benchmarks/scale.py --users 100000                       # SQLite (the embedded default)
    python benchmarks/scale.py --users 1000000 --postgres-url URL   # or --start-postgres (Debian's)

Prints one line per operation with its seconds, and the event-log rows and bytes per adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

import sqlalchemy as db  # noqa: E402

MODES = ["mail_reply", "search_suggest"]
BASE = "tiny-llama"
CHUNK = 20_000

GRAPHQL = {
    "asset graph": ("""query { assetNodes { id assetKey { path } groupName dependencyKeys { path }
        partitionDefinition { type } } }""", {}),
    "asset page (mail_reply/adapter)": ("""query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) {
        ... on AssetNode { partitionStats { numMaterialized numMaterializing numFailed numPartitions }
          assetMaterializations(limit: 1) { runId timestamp metadataEntries { label } }
          assetChecksOrError { ... on AssetChecks { checks { name
            executionForLatestMaterialization { status } } } } } } }""", {"k": {"path": ["mail_reply", "adapter"]}}),
    "partition health (mail_reply/adapter)": ("""query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) {
        ... on AssetNode { assetPartitionStatuses { __typename
          ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } } } } }""",
                                              {"k": {"path": ["mail_reply", "adapter"]}}),
    "checks tab (eval_gate)": ("""query($k: AssetKeyInput!) { assetCheckExecutions(assetKey: $k,
        checkName: "eval_gate", limit: 25) { id status runId evaluation { success } } }""",
                               {"k": {"path": ["mail_reply", "adapter"]}}),
    "dataset page (mail_reply/dataset)": ("""query($k: AssetKeyInput!) { assetNodeOrError(assetKey: $k) {
        ... on AssetNode { assetMaterializations(limit: 1) { runId timestamp } } } }""",
                                          {"k": {"path": ["mail_reply", "dataset"]}}),
    "run list (25 newest)": ("""query { runsOrError(limit: 25) { ... on Runs { results { runId status jobName
        tags { key value } } } } }""", {}),
}


@contextmanager
def timed(results: list, name: str):
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    results.append((name, seconds))
    print(f"{name:<55} {seconds:8.3f} s", flush=True)


@contextmanager
def started_postgres():
    """A throwaway Postgres on 127.0.0.1 (Debian's package), as the test suite starts one."""
    import glob
    import socket

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise SystemExit("error: no PostgreSQL server binaries (apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="lora-scale-pg-", dir="/tmp"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres",
                    "--auth=trust"], check=True, capture_output=True)
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l", str(root / "log"),
                    "-o", f"-h 127.0.0.1 -p {port} -k {root}", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def template(instance, res, n: int) -> tuple[list[str], list[str]]:
    """A real batch of n users through the product's jobs; returns the users and the run ids."""
    from lora_assets.data.synthetic import generate_user
    from lora_assets.data.user_store import write_user
    from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch

    users = [f"t{i:03d}" for i in range(n)]
    for user in users:
        tables = generate_user(user, scale=1)
        write_user(res.store(), user, {s: tables[s] for s in ("mail", "contacts", "browsing")})
    register_users(res.settings(), users)
    built = run_dataset_batch(instance, {u: ["mail", "contacts", "browsing"] for u in users}, res)
    trained = run_adapter_batch(instance, BASE, [(u, m) for u in users for m in MODES], res)
    assert built.success and trained.success, "the template batch failed"
    return users, [built.run_id, trained.run_id]


def copy_state(state, template_users: list[str], n: int) -> None:
    """The template users' state rows, for n user ids (bulk inserts of the same rows)."""
    from lora_assets.state_schema import USER_TABLES

    with state.engine.connect() as conn:
        rows = {t.name: [dict(r._mapping) for r in conn.execute(db.select(t).where(t.c.user.in_(template_users)))]
                for t in USER_TABLES}
    for table in USER_TABLES:
        source = [r for r in rows[table.name] if r["user"] == template_users[0]]
        batch = []
        for i in range(n):
            user = f"u{i:07d}"
            for row in source:
                batch.append({k: v for k, v in {**row, "user": user}.items() if k != "id"})
            if len(batch) >= CHUNK:
                with state.engine.begin() as conn:
                    conn.execute(table.insert(), batch)
                batch = []
        if batch:
            with state.engine.begin() as conn:
                conn.execute(table.insert(), batch)
    with state.engine.begin() as conn:
        conn.execute(db.text("ANALYZE"))  # fresh planner statistics, as a live database has


def copy_runs(instance, run_ids: list[str], copies: int) -> None:
    """``copies`` copies of each template run: run row, tags, event-log rows, check executions."""
    from lora_assets.orchestration.internals import (
        AssetCheckExecutionsTable,
        RunsTable,
        RunTagsTable,
        SqlEventLogStorageTable,
    )

    E, C, R, T = SqlEventLogStorageTable, AssetCheckExecutionsTable, RunsTable, RunTagsTable
    storage = instance.event_log_storage
    with instance.run_storage.connect() as conn:
        runs = {i: dict(conn.execute(db.select(R).where(R.c.run_id == i)).first()._mapping) for i in run_ids}
        tags = {i: [dict(r._mapping) for r in conn.execute(db.select(T).where(T.c.run_id == i))] for i in run_ids}
    with storage.index_connection() as conn:
        events = {i: [dict(r._mapping) for r in conn.execute(db.select(E).where(E.c.run_id == i))] for i in run_ids}
        checks = {i: [dict(r._mapping) for r in conn.execute(db.select(C).where(C.c.run_id == i))] for i in run_ids}

    def swap(row: dict, old: str, new: str) -> dict:
        return {k: (v.replace(old, new) if isinstance(v, str) else v) for k, v in row.items() if k != "id"}

    for start in range(0, copies, 500):
        new_runs, new_tags, new_events, new_checks = [], [], [], []
        for _ in range(start, min(copies, start + 500)):
            for old in run_ids:
                new = str(uuid.uuid4())
                new_runs.append(swap(runs[old], old, new))
                new_tags.extend(swap(t, old, new) for t in tags[old])
                new_events.extend(swap(e, old, new) for e in events[old])
                new_checks.extend(swap(c, old, new) for c in checks[old])
        with instance.run_storage.connect() as conn:
            conn.execute(R.insert(), new_runs)
            conn.execute(T.insert(), new_tags)
        with storage.index_connection() as conn:
            conn.execute(E.insert(), new_events)
            if new_checks:
                conn.execute(C.insert(), new_checks)


def event_log_per_adapter(instance, run_ids: list[str], adapters: int) -> tuple[float, float]:
    """(rows, bytes of event JSON) the template's runs wrote, per adapter they trained: every
    event of the runs, read from each run's own storage (SQLite keeps a database per run, and
    copies asset events into its index; Postgres has one table)."""
    from lora_assets.orchestration.internals import SqlEventLogStorageTable as E

    rows = size = 0
    for run_id in run_ids:
        with instance.event_log_storage.run_connection(run_id) as conn:
            n, b = conn.execute(db.select(db.func.count(), db.func.sum(db.func.length(E.c.event)))
                                .where(E.c.run_id == run_id)).first()
        rows, size = rows + n, size + (b or 0)
    return rows / adapters, size / adapters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--template-users", type=int, default=32, help="users of the real template batch (default 32: users_per_run)")
    parser.add_argument("--postgres-url", help="a Postgres for the Dagster instance and the state table")
    parser.add_argument("--start-postgres", action="store_true", help="start a throwaway Postgres (Debian's package)")
    parser.add_argument("--state-only", action="store_true",
                        help="copy the state rows only, not the runs (status, planning and ticks at N users in minutes)")
    args = parser.parse_args()
    if args.start_postgres:
        with started_postgres() as url:
            return run(args, url)
    return run(args, args.postgres_url)


def run(args, postgres_url: str | None) -> int:
    work = Path(tempfile.mkdtemp(prefix="lora-scale-"))
    os.environ["LORA_ASSETS_HOME"] = str(work / "data")
    os.environ["DAGSTER_HOME"] = str(work / "dagster")
    (work / "dagster").mkdir()
    yaml = (PROJECT / "dagster.yaml").read_text()
    if postgres_url:
        yaml += f"\nstorage:\n  postgres:\n    postgres_url: {postgres_url}\n"
        os.environ["LORA_ASSETS_STATE_URL"] = postgres_url
    (work / "dagster" / "dagster.yaml").write_text(yaml)

    from dagster import DagsterInstance

    from lora_assets.orchestration.resources import LoraAssetsHome
    from lora_assets.orchestration.runs import register_base_model_partition
    from lora_assets.training import TINY_BASE_MODEL, load_base_model

    load_base_model(TINY_BASE_MODEL, work / "data")
    instance = DagsterInstance.get()
    res = LoraAssetsHome(home=str(work / "data"), train_steps=2, gate_margin=-100.0, gate_confidence=1.0,
                         users_per_run=args.template_users)
    settings = res.settings()
    if postgres_url:
        from lora_assets.state_schema import metadata

        metadata.drop_all(settings.state().engine)
        metadata.create_all(settings.state().engine)
    backend = "Postgres" if postgres_url else "SQLite"
    print(f"{args.users} users x {len(MODES)} trained modes on {backend}; template batch of {args.template_users} users")
    register_base_model_partition(instance, BASE)
    users, run_ids = template(instance, res, args.template_users)
    rows, size = event_log_per_adapter(instance, run_ids, len(users) * len(MODES))
    print(f"event log per retrained adapter: {rows:.2f} rows, {size / 1024:.2f} KB of event JSON "
          f"(batch of {len(users)} users, dataset and adapter runs)")
    started = time.perf_counter()
    copy_state(settings.state(), users, args.users)
    copies = 0 if args.state_only else max(1, args.users // args.template_users)
    copy_runs(instance, run_ids, copies)
    print(f"built in {time.perf_counter() - started:.0f} s: {args.users} users' state rows, "
          f"{copies * len(run_ids)} runs", flush=True)
    results: list = []
    measure(instance, res, settings, results, args.users)
    print("SCALE BENCHMARK OK")
    return 0


def measure(instance, res, settings, results: list, n: int) -> None:
    from lora_assets.orchestration.internals import LoadableTargetOrigin, in_process_test_workspace
    from dagster_graphql.test.utils import execute_dagster_graphql

    from lora_assets.data.ingest import ingest
    from lora_assets.definitions import defs
    from lora_assets.orchestration.registry import backfill_requests
    from lora_assets.orchestration.run_requests import plan_backfill_page
    from lora_assets.orchestration.sensors import adapter_retrain_sensor, change_feed_sensor
    from lora_assets.orchestration.status import status
    from lora_assets_tests.ticks import evaluate_tick

    origin = LoadableTargetOrigin(executable_path=sys.executable, module_name="lora_assets.definitions", attribute="defs")
    with in_process_test_workspace(instance, origin) as context:
        for name, (query, variables) in GRAPHQL.items():
            with timed(results, f"UI: {name}"):
                result = execute_dagster_graphql(context, query, variables)
            assert not result.errors, (name, result.errors)
    middle = f"u{n // 2:07d}"
    with timed(results, "lora-assets status --user (one user, every mode)"):
        status(instance, settings, user=middle)
    with timed(results, "lora-assets status --mode mail_reply (counts + first page)"):
        report = status(instance, settings, mode="mail_reply", limit=50)
    print(f"    totals: {report.totals()}")
    with timed(results, "lora-assets status --mode mail_reply --state stale"):
        status(instance, settings, mode="mail_reply", limit=50, states=["stale"])
    with timed(results, "backfill planning: one page for a new base model"):
        plan_backfill_page(settings, "new-base", None, 8 * settings.users_per_run)
    assert not backfill_requests(instance)

    changed = [f"u{i:07d}" for i in range(0, 32)]
    for user in changed:
        ingest(res.store(), res.feed(), user, "browsing", [{"id": "b-new", "query": "rye flour"}])
    cursor = None
    with timed(results, "change_feed_sensor tick (32 changed users)"):
        tick = evaluate_tick(change_feed_sensor, instance, res, cursor, defs)
    assert tick.run_requests, "the change sensor requested the changed users' datasets"
    state = settings.state()
    head = state.last_change_id()
    for user in changed:
        state.record_dataset(user, "search_suggest", f"v-new-{user}", 10, 8)
    cursor = json.dumps({"changes": head, "failures": ""})
    with timed(results, "adapter_retrain_sensor tick (32 changed datasets)"):
        tick = evaluate_tick(adapter_retrain_sensor, instance, res, cursor, defs)
    assert tick.run_requests, "the adapter sensor requested the changed users' adapters"


if __name__ == "__main__":
    raise SystemExit(main())
