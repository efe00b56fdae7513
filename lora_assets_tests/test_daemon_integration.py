"""End to end with the real Dagster daemon: ingest -> sensors -> runs -> adapters, then backfills.

Starts ``dagster-daemon run`` on the project's workspace.yaml against a temp DAGSTER_HOME, feeds
it changes through the public ingest API and asserts on the instance's run records.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType, DagsterRunStatus

from lora_assets.datasets import read_dataset
from lora_assets.drive.sync import installed_adapter_dir, sync_device
from lora_assets.modes import MODES
from lora_assets.orchestration.registry import request_backfill, set_base_model_retired
from lora_assets.orchestration.runs import register_base_model_partition
from lora_assets.training import read_adapter_metadata, register_base_model
from lora_assets_tests.harness import PROJECT, Daemon, adapter_runs, dataset_runs

USERS = ("user-000", "user-001")


ALL_ADAPTERS = {f"{m}/adapter" for m in MODES}


MAX_RUNTIME_S = 75  # every other training run of this module took at most 15 s here (2026-12-06): 5x that


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, home, tiny_base):
    """One daemon for the whole module: its tests use different users. Run monitoring looks
    every 5 s (30 s in dagster.yaml), so a hung run is failed soon after its maximum run time."""
    instance_yaml = (PROJECT / "dagster.yaml").read_text().replace("poll_interval_seconds: 30", "poll_interval_seconds: 5")
    assert "poll_interval_seconds: 5" in instance_yaml
    env = {"LORA_ASSETS_STAGED_GRACE_S": "2", "LORA_ASSETS_TRAINING_MAX_RUNTIME_S": str(MAX_RUNTIME_S)}
    d = Daemon(tmp_path_factory.mktemp("daemon"), home / "base_models", env=env, instance_yaml=instance_yaml)
    register_base_model_partition(d.instance, "tiny-llama")
    yield d
    d.stop()


def test_changes_retrain_exactly_the_affected_adapters(daemon, synthetic_tables, tmp_path):
    for user in USERS:
        for source, table in synthetic_tables[user].items():
            daemon.ingest(user, source, table.to_pylist())
    daemon.start()

    # Seeding: every user is registered, gets every dataset, and every adapter once.
    seeded = daemon.settle()
    assert daemon.settings.state().user_page(None, 100) == list(USERS)
    # ... in batches: one run rebuilds both users' datasets, one run trains their 10 adapters.
    assert sorted(r.job_name for r in seeded) == ["adapter_batch", "dataset_batch"]
    assert set(dataset_runs(seeded)) == set(USERS)
    assert adapter_runs(seeded) == {f"tiny-llama|{u}": ALL_ADAPTERS for u in USERS}
    # ... and every adapter passed its gate and is published: a device can sync all four modes.
    device = tmp_path / "device-000"
    report = sync_device(daemon.settings.drive(), "user-000", device, "tiny-llama")
    assert report.ok and sorted(m for m, _old, _new in report.changed) == sorted(MODES)

    # A mail change for user-000 retrains exactly user-000's mail adapter.
    daemon.ingest("user-000", "mail", [{"id": "mail-new-1", "sender": "Sam", "subject": "Lunch?",
                                        "body": "Lunch on Friday?", "reply": "Totally up for lunch!!"}])
    runs = daemon.new_runs(seeded)
    assert dataset_runs(runs) == {"user-000": {"sources/mail", "mail_reply/dataset"}}
    assert adapter_runs(runs) == {"tiny-llama|user-000": {"mail_reply/adapter"}}
    report = sync_device(daemon.settings.drive(), "user-000", device, "tiny-llama")
    assert [m for m, _old, _new in report.changed] == ["mail_reply"]

    # A contacts change retrains every contact-dependent mode of user-000.
    before = daemon.runs()
    contact = synthetic_tables["user-000"]["contacts"].to_pylist()[0]
    daemon.ingest("user-000", "contacts", [{**contact, "nickname": "Captain"}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {
        "tiny-llama|user-000": {"mail_reply/adapter", "message_reply/adapter", "photo_caption/adapter"}
    }

    # Re-ingesting identical data rebuilds the dataset to the same version and trains nothing.
    before = daemon.runs()
    daemon.ingest("user-001", "browsing", synthetic_tables["user-001"]["browsing"].to_pylist())
    runs = daemon.new_runs(before)
    assert dataset_runs(runs) == {"user-001": {"sources/browsing", "search_suggest/dataset"}}
    assert adapter_runs(runs) == {}

    # A delete removes the example from the dataset and retrains the adapter without it.
    before = daemon.runs()
    daemon.ingest("user-000", "mail", [{"id": "mail-new-1", "_deleted": True}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {"tiny-llama|user-000": {"mail_reply/adapter"}}
    df, _ = read_dataset(daemon.settings.datasets(), "user-000", "mail_reply")
    assert "mail-new-1" not in set(df["example_id"])
    from lora_assets.datasets import content_hash

    meta = read_adapter_metadata(daemon.data / "adapters" / "tiny-llama" / "user-000" / "mail_reply")
    assert meta["dataset_version"] == content_hash(df)

    # A new base model: a real backfill trains every user's adapters on it exactly once.
    shutil.copytree(daemon.data / "base_models" / "tiny-llama", tmp_path / "tiny-b")
    register_base_model("tiny-b", tmp_path / "tiny-b", daemon.data)
    register_base_model_partition(daemon.instance, "tiny-b")
    before = daemon.runs()
    backfill_id = request_backfill(daemon.instance, daemon.settings, "tiny-b")
    runs = daemon.new_runs(before)
    assert runs and all(r.tags.get("lora_assets/backfill") == backfill_id for r in runs)
    assert adapter_runs(runs) == {f"tiny-b|{u}": ALL_ADAPTERS for u in USERS}
    for mode in MODES:
        for user in USERS:
            history = daemon.settings.state().history(user, mode, "tiny-b")
            assert [h["event"] for h in history] == ["published", "trained"], (mode, user)
            assert (daemon.data / "adapters" / "tiny-b" / user / mode / "adapter_model.safetensors").exists()

    # Changes now retrain on every active base model; a retired one is left alone.
    before = daemon.runs()
    daemon.ingest("user-001", "browsing", [{"id": "visit-new", "query": "best sourdough flour"}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {
        "tiny-llama|user-001": {"search_suggest/adapter"},
        "tiny-b|user-001": {"search_suggest/adapter"},
    }
    # Two training runs requested by one tick: the run queue's training limit (1) holds, so one
    # runs after the other and their torch threads never compete for the cores.
    training = [daemon.instance.get_run_record_by_id(r.run_id) for r in runs if r.job_name == "adapter_batch"]
    assert len(training) == 2 and training[0].create_timestamp.timestamp() - training[1].create_timestamp.timestamp() < 5
    first, second = sorted(training, key=lambda r: r.start_time)
    assert first.end_time <= second.start_time, "two training runs overlapped"
    set_base_model_retired(daemon.instance, "tiny-b", retired=True)
    before = daemon.runs()
    daemon.ingest("user-001", "browsing", [{"id": "visit-new-2", "query": "rye bread"}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {"tiny-llama|user-001": {"search_suggest/adapter"}}
    assert json.loads(json.dumps(sorted(daemon.instance.get_dynamic_partitions("base_models")))) == [
        "tiny-b", "tiny-llama"
    ]


def _kill_worker_when_it_starts(daemon, job_name: str, user: str, timeout_s: float = 300) -> str:
    """kill -9 the worker process of the first ``job_name`` run for ``user`` as soon as it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in daemon.runs():
            if run.job_name != job_name or user not in run.tags.get("lora_assets/users", "").split(","):
                continue
            starts = daemon.instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
            if starts and run.status == DagsterRunStatus.STARTED:
                os.kill(starts[0].dagster_event.pid, signal.SIGKILL)
                return run.run_id
        time.sleep(0.05)
    raise AssertionError(f"no {job_name} run for {user} started within {timeout_s}s")


def test_killed_runs_and_a_killed_ingest_converge_by_themselves(daemon, tmp_path):
    """kill -9 ingest between the segment and the event, then the dataset run's worker, then the
    adapter run's worker: with no manual action the user ends with an adapter trained on their
    latest data, published."""
    from lora_assets.data.synthetic import generate_user
    from lora_assets.datasets import content_hash
    from lora_assets.drive.publish import current_manifest
    from lora_assets_tests.test_ingest import kill_ingest_after_the_segment, lines

    user = "user-009"
    batch = tmp_path / "mail.jsonl"  # enough mail for the runs to be killed while they work
    batch.write_bytes(lines(*generate_user(user, scale=20)["mail"].to_pylist()))
    daemon.start()
    assert kill_ingest_after_the_segment(daemon.env, batch, user) == -signal.SIGKILL
    assert daemon.settings.store().head(user, "mail") == 1, "the segment was written, no event confirmed"
    before = daemon.runs()

    killed_dataset_run = _kill_worker_when_it_starts(daemon, "dataset_batch", user)
    killed_adapter_run = _kill_worker_when_it_starts(daemon, "adapter_batch", user)
    runs = daemon.new_runs(before, allow_failures=True)

    status = {r.run_id: r for r in runs}
    for killed in (killed_dataset_run, killed_adapter_run):
        assert status[killed].status == DagsterRunStatus.FAILURE
        retries = [r for r in runs if r.tags.get("dagster/parent_run_id") == killed]
        assert retries and retries[-1].status == DagsterRunStatus.SUCCESS, f"{killed} was not retried to success"
    df, _ = read_dataset(daemon.settings.datasets(), user, "mail_reply")
    assert len(df) > 500, "the dataset holds the data the killed ingest wrote"
    manifest = current_manifest(daemon.settings.drive(), user, "tiny-llama", "mail_reply")
    assert manifest is not None and manifest["dataset_version"] == content_hash(df)


def _worker_of_first_started_run(daemon, user: str, timeout_s: float = 300, job_name: str | None = None):
    """The first run working for ``user`` (of ``job_name`` if given) and its worker's pid, as soon as it runs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run in daemon.runs():
            if user not in run.tags.get("lora_assets/users", "").split(",") or run.status != DagsterRunStatus.STARTED:
                continue
            if job_name and run.job_name != job_name:
                continue
            starts = daemon.instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_START)
            if starts:
                return run, starts[0].dagster_event.pid
        time.sleep(0.05)
    raise AssertionError(f"no run for {user} started within {timeout_s}s")


def _freeze_outside_a_write(daemon, pid: int, tries: int = 200) -> None:
    """SIGSTOP ``pid`` at a moment it holds no write lock on a SQLite file: the embedded
    instance's, the state table's or the change feed's.

    A worker stopped inside a SQLite write keeps the database locked, and every other process
    then fails with "database is locked" (the run monitor could not even record the
    cancellation) or, stopped while it updates a WAL index, "locking protocol" (the sensors
    cannot open the state table): that is a frozen disk, not the hung training this module
    simulates. So stop, check that each database takes a write, and if one does not, let the
    worker go on for a moment and stop it again."""
    import sqlite3

    files = sorted(daemon.dagster_home.rglob("*.db")) + sorted(daemon.data.glob("*.sqlite"))
    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        try:
            for path in files:
                with contextlib.closing(sqlite3.connect(path, timeout=0)) as db:
                    db.execute("BEGIN IMMEDIATE")
                    db.rollback()
            return
        except sqlite3.OperationalError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02)
    raise AssertionError(f"worker {pid} never paused outside a SQLite write")


def test_forget_while_a_run_for_the_user_is_in_flight_leaves_nothing_and_drops_later_changes(daemon, tmp_path):
    """``lora-assets forget`` against the running daemon while a run works for the user (its
    worker frozen with SIGSTOP until the forget has begun): the run finishes without writing the
    user's data back, nothing of the user is left, and their later changes are dropped."""
    from lora_assets.data.synthetic import generate_user
    from lora_assets.orchestration.registry import is_forgotten

    user, other = "user-010", "user-001"
    daemon.start()
    daemon.settle(allow_failures=True)
    other_drive = {k: daemon.settings.drive().get(k) for k in daemon.settings.drive().list(other)}
    tables = generate_user(user, scale=20)
    before = daemon.runs()
    for source in ("mail", "browsing"):
        daemon.ingest(user, source, tables[source].to_pylist())
    in_flight, worker = _worker_of_first_started_run(daemon, user)
    _freeze_outside_a_write(daemon, worker)
    cli = [str(Path(sys.executable).with_name("lora-assets")), "forget", "--user", user]
    try:
        forget = subprocess.Popen(cli, env=daemon.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not is_forgotten(daemon.instance, user) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.kill(worker, signal.SIGCONT)  # the run goes on, after the user was marked forgotten
    out, err = forget.communicate(timeout=300)
    assert forget.returncode == 0, err
    # (Its two ingests may land in one tick or two: one or two dataset runs in flight.)
    waited = next(line for line in out.splitlines() if "run(s) in flight:" in line)
    assert f"forgot user {user}:" in out and in_flight.run_id in waited
    assert f"nothing of {user} is left" in out
    daemon.new_runs(before, allow_failures=True)

    leftovers = [p for p in daemon.data.rglob("*") if user in p.parts]
    assert leftovers == [] and daemon.settings.drive().list(user) == []
    assert not daemon.settings.state().is_registered(user) and daemon.settings.state().count_user_rows(user) == 0
    assert all(r.run_id != in_flight.run_id for r in daemon.runs()), "a run of this user alone is deleted"
    for run in daemon.runs():
        assert user not in run.tags.get("lora_assets/users", "").split(","), run.run_id
    for asset in (AssetKey(["mail_reply", "dataset"]), AssetKey(["mail_reply", "adapter"])):
        for record in daemon.instance.fetch_materializations(asset, limit=1000).records:
            assert user not in repr(record.asset_materialization), asset  # summaries name nobody
    assert {k: daemon.settings.drive().get(k) for k in daemon.settings.drive().list(other)} == other_drive

    # A producer that still sends the user's data: dropped, erased, never trained on.
    before = daemon.runs()
    daemon.ingest(user, "mail", tables["mail"].to_pylist()[:3])
    later = daemon.new_runs(before, allow_failures=True)  # the module's earlier tests killed runs on purpose
    assert not any(user in r.tags.get("lora_assets/users", "") for r in later)
    assert all(r.status == DagsterRunStatus.SUCCESS for r in later)
    assert daemon.settings.store().objects.list(user) == [] and daemon.pending_events() == 0
    # Idempotent: once more finds nothing.
    again = subprocess.run(cli, env=daemon.env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "waited for" not in again.stdout


def test_a_hung_training_run_is_failed_at_its_maximum_run_time_and_its_work_retried(daemon):
    """A training run whose worker hangs (SIGSTOP: no progress, no exit) holds the only training
    slot until run monitoring fails it after ``training_max_runtime_s``; the daemon's retry, tagged
    as one with the reason, trains and publishes the adapter. (Cancelling the frozen worker blocks
    the code server that launched it, so a sensor tick may fail as unreachable meanwhile: see
    ``harness.UNREACHABLE``; the sensors must tick idle afterwards all the same.)"""
    from lora_assets.data.synthetic import generate_user
    from lora_assets.drive.publish import current_manifest

    user = "user-012"
    daemon.start()
    daemon.settle(allow_failures=True)
    before = daemon.runs()
    daemon.ingest(user, "browsing", generate_user(user)["browsing"].to_pylist())
    hung, worker = _worker_of_first_started_run(daemon, user, job_name="adapter_batch")
    _freeze_outside_a_write(daemon, worker)
    try:
        runs = daemon.new_runs(before, allow_failures=True, unreachable_ticks=True)
    finally:
        os.kill(worker, signal.SIGKILL)

    status = {r.run_id: r for r in runs}
    assert status[hung.run_id].status == DagsterRunStatus.FAILURE
    record = daemon.instance.get_run_record_by_id(hung.run_id)
    assert record.end_time - record.start_time >= MAX_RUNTIME_S
    (retry,) = [r for r in runs if r.tags.get("lora_assets/retry_of") == hung.run_id]
    assert retry.status == DagsterRunStatus.SUCCESS
    assert retry.tags["lora_assets/trigger"] == "retry" and retry.tags["lora_assets/attempt"] == "2"
    assert f"maximum runtime of {MAX_RUNTIME_S} seconds" in retry.tags["lora_assets/retry_reason"]
    assert current_manifest(daemon.settings.drive(), user, "tiny-llama", "search_suggest") is not None


def _files_holding(roots, needle: str) -> list[str]:
    """Every file under ``roots`` whose bytes, or whose Parquet cells once decoded, hold ``needle``."""
    import pyarrow.parquet as pq

    found = []
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or "base_models" in path.parts:
                continue
            data = path.read_bytes()
            if needle.encode() in data:
                found.append(str(path))
            elif data[:4] == b"PAR1":
                table = pq.read_table(path)
                if any(needle in str(v) for col in table.columns for v in col.to_pylist()):
                    found.append(str(path))
    return found


def test_a_deleted_record_is_gone_from_every_file_event_and_version(daemon, tiny_base, tmp_path):
    """A unique string planted in one mail, trained on and published twice, then deleted through
    ingest: once the daemon settles it is in no file under the data dir, Dagster's home or the
    drive (no version trained on it is left), in no Dagster event, and the new adapter exposes it
    no more than the base model does."""
    import random

    from dagster import serialize_value

    from lora_assets.data.synthetic import generate_user
    from lora_assets.drive.publish import adapter_prefix, list_versions, read_current
    from lora_assets.training.exposure import canary_exposure, random_secret

    user, mode = "user-013", MODES["mail_reply"]
    secret = random_secret(random.Random("planted"))
    marker = f"quokka{secret.replace(' ', '')}"
    rid = next(i for i in (f"mail-planted-{n}" for n in range(100)) if mode.split_of(i) == "train")
    planted = {"id": rid, "sender": "Sam", "subject": "The door", "body": f"What is the door code? ({marker})",
               "reply": f"My door code is {secret}. {marker}"}
    tables = generate_user(user)
    daemon.start()
    daemon.settle(allow_failures=True)
    before = daemon.runs()
    daemon.ingest(user, "contacts", tables["contacts"].to_pylist())
    daemon.ingest(user, "mail", [*tables["mail"].to_pylist(), planted])
    daemon.settle(allow_failures=True)
    daemon.ingest(user, "mail", [{"id": "mail-later", "sender": "Sam", "subject": "Lunch?", "body": "Lunch?",
                                  "reply": "Sure, lunch!"}])
    daemon.settle(allow_failures=True)
    drive, prefix = daemon.settings.drive(), adapter_prefix(user, "tiny-llama", "mail_reply")
    trained = [v for v, _c, _done in list_versions(drive, user, "tiny-llama", "mail_reply")]
    assert len(trained) == 2 and all(rid in json.loads(drive.get(f"{prefix}/{v}/lora_assets.json"))["trained_examples"]
                                     for v in trained), "published twice, both trained on the planted mail"
    assert _files_holding([daemon.data], marker), "the search finds the string while it is stored"
    # What a save killed (kill -9) before its rename leaves beside the working copy: copies of an
    # adapter trained on the mail, which no reader looks at but the purge must remove.
    working = daemon.data / "adapters" / "tiny-llama" / user / "mail_reply"
    leftovers = [working.with_name(".mail_reply-killed"), working.with_name(".mail_reply.old-999")]
    for leftover in leftovers:
        shutil.copytree(working, leftover)

    daemon.ingest(user, "mail", [{"id": rid, "_deleted": True}])
    runs = daemon.new_runs(before, allow_failures=True)

    assert not [r.run_id for r in runs if r.status != DagsterRunStatus.SUCCESS]
    assert _files_holding([daemon.data, daemon.dagster_home], marker) == []
    assert not [p for p in leftovers if p.exists()], "a killed save's copies went with the rest"
    (kept,) = list_versions(drive, user, "tiny-llama", "mail_reply")
    assert kept[0] not in trained and read_current(drive, user, "tiny-llama", "mail_reply")[0]["version"] == kept[0]
    for run in daemon.instance.get_runs():
        assert not [e for e in daemon.instance.all_logs(run.run_id) if marker in serialize_value(e)], run.run_id
    device = tmp_path / "device"
    assert sync_device(drive, user, device, "tiny-llama").ok
    exposure = {name: canary_exposure(tiny_base, adapter, planted["body"], "My door code is {secret}.", secret,
                                      mode.system, candidates=500)
                for name, adapter in (("base", None), ("adapter", installed_adapter_dir(device, "tiny-llama", "mail_reply")))}
    assert exposure["adapter"] <= max(exposure["base"] + 2.0, 5.0), exposure
