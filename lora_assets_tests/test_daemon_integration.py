"""End to end with the real Dagster daemon: ingest -> sensors -> runs -> adapters, then backfills.

Starts ``dagster-daemon run`` on the project's workspace.yaml against a temp DAGSTER_HOME, feeds
it changes through the public ingest API and asserts on the instance's run records.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance, DagsterRunStatus
from dagster._core.execution.backfill import BulkActionStatus
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from lora_assets.data.ingest import ingest
from lora_assets.datasets import read_dataset
from lora_assets.drive.sync import sync_device
from lora_assets.modes import MODES
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import (
    launch_adapter_backfill,
    register_base_model_partition,
)
from lora_assets.orchestration.sensors import set_base_model_retired
from lora_assets.training import read_adapter_metadata, register_base_model

PROJECT = Path(__file__).resolve().parents[1]
USERS = ("user-000", "user-001")
SETTLE_TIMEOUT_S = 420


class Daemon:
    """The daemon and everything it needs, plus helpers to wait and to read runs."""

    def __init__(self, tmp: Path, base_models: Path) -> None:
        self.dagster_home = tmp / "dagster_home"
        self.dagster_home.mkdir()
        shutil.copy(PROJECT / "dagster.yaml", self.dagster_home / "dagster.yaml")
        self.data = tmp / "data"
        self.data.mkdir()
        (self.data / "base_models").symlink_to(base_models, target_is_directory=True)
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            "LORA_ASSETS_HOME": str(self.data),
            "LORA_ASSETS_SENSOR_INTERVAL_S": "1",
            "LORA_ASSETS_TRAIN_STEPS": "3",
            # Gate on "better than base"; retrains of a few steps may tie the published version.
            "LORA_ASSETS_GATE_MARGIN": "0.0",
            "LORA_ASSETS_GATE_TOLERANCE": "1.0",
        }
        self.instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(self.dagster_home)))
        self.resources = LoraAssetsHome(home=str(self.data))
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = self.log_path.open("w")
        daemon = Path(sys.executable).with_name("dagster-daemon")
        self.proc = subprocess.Popen(
            [str(daemon), "run", "-w", str(PROJECT / "workspace.yaml")],
            cwd=PROJECT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            self.log.close()
        self.instance.dispose()

    def ingest(self, user: str, source: str, records: list[dict]) -> None:
        ingest(self.resources.store(), self.resources.feed(), user, source, records)

    def runs(self) -> list:
        return [r.dagster_run for r in self.instance.get_run_records()]

    def settle(self, quiet_s: float = 12.0) -> list:
        """Wait until the feed is drained, no run is live, and no new run appeared for a while."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        seen, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the daemon died; see {self.log_path}"
            runs = self.runs()
            busy = any(r.status in NOT_FINISHED_STATUSES for r in runs) or self.resources.feed().pending_count()
            backfills = [b for b in self.instance.get_backfills() if b.status == BulkActionStatus.REQUESTED]
            if len(runs) != seen or busy or backfills:
                seen, quiet_since = len(runs), time.monotonic()
            elif time.monotonic() - quiet_since > quiet_s:
                failed = [r.run_id for r in runs if r.status == DagsterRunStatus.FAILURE]
                assert not failed, f"failed runs: {failed}"
                return runs
            time.sleep(1)
        raise AssertionError(f"did not settle in {SETTLE_TIMEOUT_S}s; runs: {[(r.run_id, r.status) for r in self.runs()]}")

    def new_runs(self, before: list) -> list:
        known = {r.run_id for r in before}
        return [r for r in self.settle() if r.run_id not in known]


def adapter_runs(runs: list) -> dict[str, set[str]]:
    """partition -> adapter assets trained over the given runs; each (partition, adapter) once."""
    out: dict[str, set[str]] = {}
    for run in runs:
        keys = {k.to_user_string() for k in run.asset_selection or ()}
        adapters = {k for k in keys if k.endswith("/adapter")}
        if adapters:
            partition = run.tags.get("dagster/partition", "")
            trained = out.setdefault(partition, set())
            assert not trained & adapters, f"{partition}: {trained & adapters} trained twice"
            trained |= adapters
    return out


def dataset_runs(runs: list) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for run in runs:
        keys = {k.to_user_string() for k in run.asset_selection or ()}
        if any(k.endswith("/dataset") or k.startswith("sources/") for k in keys):
            out.setdefault(run.tags["dagster/partition"], set()).update(keys)
    return out


ALL_ADAPTERS = {f"{m}/adapter" for m in MODES}


@pytest.fixture
def daemon(tmp_path, home, tiny_base):
    d = Daemon(tmp_path, home / "base_models")
    yield d
    d.stop()


def test_changes_retrain_exactly_the_affected_adapters(daemon, synthetic_tables, tmp_path):
    register_base_model_partition(daemon.instance, "tiny-llama")
    for user in USERS:
        for source, table in synthetic_tables[user].items():
            daemon.ingest(user, source, table.to_pylist())
    daemon.start()

    # Seeding: every user becomes a partition, gets every dataset, and every adapter once.
    seeded = daemon.settle()
    assert sorted(daemon.instance.get_dynamic_partitions("users")) == list(USERS)
    assert set(dataset_runs(seeded)) == set(USERS)
    assert adapter_runs(seeded) == {f"tiny-llama|{u}": ALL_ADAPTERS for u in USERS}
    # ... and every adapter passed its gate and is published: a device can sync all four modes.
    device = tmp_path / "device-000"
    report = sync_device(daemon.resources.drive(), "user-000", device, "tiny-llama")
    assert report.ok and sorted(m for m, _old, _new in report.changed) == sorted(MODES)

    # A mail change for user-000 retrains exactly user-000's mail adapter.
    daemon.ingest("user-000", "mail", [{"id": "mail-new-1", "sender": "Sam", "subject": "Lunch?",
                                        "body": "Lunch on Friday?", "reply": "Totally up for lunch!!"}])
    runs = daemon.new_runs(seeded)
    assert dataset_runs(runs) == {"user-000": {"sources/mail", "mail_reply/dataset"}}
    assert adapter_runs(runs) == {"tiny-llama|user-000": {"mail_reply/adapter"}}
    report = sync_device(daemon.resources.drive(), "user-000", device, "tiny-llama")
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
    df, _ = read_dataset(daemon.resources.datasets(), "user-000", "mail_reply")
    assert "mail-new-1" not in set(df["example_id"])
    from lora_assets.datasets import content_hash

    meta = read_adapter_metadata(daemon.data / "adapters" / "tiny-llama" / "user-000" / "mail_reply")
    assert meta["dataset_version"] == content_hash(df)

    # A new base model: a real backfill trains every user's adapters on it exactly once.
    shutil.copytree(daemon.data / "base_models" / "tiny-llama", tmp_path / "tiny-b")
    register_base_model("tiny-b", tmp_path / "tiny-b", daemon.data)
    register_base_model_partition(daemon.instance, "tiny-b")
    before = daemon.runs()
    backfill_id = launch_adapter_backfill(daemon.instance, "tiny-b")
    runs = daemon.new_runs(before)
    assert daemon.instance.get_backfill(backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS
    assert all(r.tags.get("dagster/backfill") == backfill_id for r in runs)
    for mode in MODES:
        for user in USERS:
            records = daemon.instance.fetch_materializations(
                AssetKey([mode, "adapter"]), limit=100
            ).records
            assert sum(r.partition_key == f"tiny-b|{user}" for r in records) == 1, (mode, user)
            assert (daemon.data / "adapters" / "tiny-b" / user / mode / "adapter_model.safetensors").exists()

    # Changes now retrain on every active base model; a retired one is left alone.
    before = daemon.runs()
    daemon.ingest("user-001", "browsing", [{"id": "visit-new", "query": "best sourdough flour"}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {
        "tiny-llama|user-001": {"search_suggest/adapter"},
        "tiny-b|user-001": {"search_suggest/adapter"},
    }
    set_base_model_retired(daemon.instance, "tiny-b", retired=True)
    before = daemon.runs()
    daemon.ingest("user-001", "browsing", [{"id": "visit-new-2", "query": "rye bread"}])
    runs = daemon.new_runs(before)
    assert adapter_runs(runs) == {"tiny-llama|user-001": {"search_suggest/adapter"}}
    assert json.loads(json.dumps(sorted(daemon.instance.get_dynamic_partitions("base_models")))) == [
        "tiny-b", "tiny-llama"
    ]
