"""A real Dagster daemon for end-to-end tests and benchmarks: started, watched, stopped.

``dagster-daemon run`` on the project's workspace.yaml against its own DAGSTER_HOME and data
dir, in its own process group (so stopping it stops its code server and run workers too).
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
from collections.abc import Mapping
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus

from lora_assets.data.ingest import ingest
from lora_assets.modes import modes_reading
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, DATASET_BATCH_JOB
from lora_assets.orchestration.internals import NOT_FINISHED_STATUSES, InstanceRef, InstigatorType, TickStatus
from lora_assets.orchestration.registry import backfill_requests
from lora_assets.settings import Settings

PROJECT = Path(__file__).resolve().parents[1]
SETTLE_TIMEOUT_S = 420
# How Dagster fails a sensor tick whose code server does not answer in time. The code server that
# launched a run whose worker is frozen (SIGSTOP) blocks for good once run monitoring cancels the
# run: its CancelExecution sets a multiprocessing Event, and Event.set() waits for every waiter
# to wake, which a stopped process never does; the server holds its execution lock meanwhile, so
# calls that need it (starting a run) pile up on its threads. A sensor tick that lands on that
# server fails this way; the daemon moves its sensors to a fresh code server within a minute.
UNREACHABLE = "DagsterUserCodeUnreachableError"


def lora_assets(*args: str, env: Mapping[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """The installed ``lora-assets`` command, as a user runs it; fails the test on a non-zero exit."""
    exe = Path(sys.executable).with_name("lora-assets")
    done = subprocess.run([str(exe), *args], env=dict(env), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class Daemon:
    """The daemon and everything it needs, plus helpers to wait and to read runs."""

    def __init__(
        self,
        tmp: Path,
        base_models: Path,
        env: Mapping[str, str] | None = None,
        instance_yaml: str | None = None,
    ) -> None:
        self.dagster_home = tmp / "dagster_home"
        self.dagster_home.mkdir(parents=True)
        if instance_yaml is None:
            shutil.copy(PROJECT / "dagster.yaml", self.dagster_home / "dagster.yaml")
        else:
            (self.dagster_home / "dagster.yaml").write_text(instance_yaml)
        self.data = tmp / "data"
        self.data.mkdir()
        (self.data / "base_models").symlink_to(base_models, target_is_directory=True)
        self.env = {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home),
            "LORA_ASSETS_HOME": str(self.data),
            "LORA_ASSETS_SENSOR_INTERVAL_S": "1",
            # Dagster's run retries (a killed worker's run launched again) look every second, not 5.
            "DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS": "1",
            "LORA_ASSETS_TRAIN_STEPS": "3",
            # Gate on "better than base"; retrains of a few steps may tie the published version.
            "LORA_ASSETS_GATE_MARGIN": "0.0",
            "LORA_ASSETS_GATE_CONFIDENCE": "1.0",
            **(env or {}),
        }
        self.instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(self.dagster_home)))
        self.settings = Settings.from_env(self.env)  # what the daemon and its runs see
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start the daemon (once: a running daemon is left as it is)."""
        if self.proc is not None and self.proc.poll() is None:
            return
        self.log = self.log_path.open("a")
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
                    pass
            # What the daemon left in its process group goes too: a code server blocked on a
            # frozen worker (see UNREACHABLE) ignores SIGTERM and would outlive the test session.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            self.log.close()
            self.proc = None
        self.instance.dispose()

    def ingest(self, user: str, source: str, records: list[dict]) -> None:
        ingest(self.settings.store(), self.settings.feed(), user, source, records)

    def runs(self) -> list:
        return [r.dagster_run for r in self.instance.get_run_records()]

    def pending_events(self) -> int:
        feed = self.settings.feed()
        return feed.pending_count() if hasattr(feed, "pending_count") else 0

    def settle(self, quiet_s: float = 3.0, allow_failures: bool = False, unreachable_ticks: bool = False,
               timeout_s: float = SETTLE_TIMEOUT_S) -> list:
        """Wait until the feed is drained, no run is live, backfills are planned, no run appeared
        or changed status for ``quiet_s`` (Dagster's retries look every second here), and every
        sensor has since ticked and requested nothing: then nothing more will happen until the
        next change. (The sensor daemon ticks every 5 s at most often.)

        A sensor tick that failed is an error, unless ``unreachable_ticks`` and Dagster failed it
        for not reaching the code server (see ``UNREACHABLE``): the sensor must still have ticked
        idle since. ``timeout_s`` bounds the wait (liveness, not speed)."""
        deadline = time.monotonic() + timeout_s
        seen, changed_at = None, time.time()
        while time.monotonic() < deadline:
            assert self.proc is None or self.proc.poll() is None, f"the daemon died; see {self.log_path}"
            runs = self.runs()
            busy = any(r.status in NOT_FINISHED_STATUSES for r in runs) or self.pending_events()
            state = sorted((r.run_id, r.status.value) for r in runs)
            if state != seen or busy or self.backfill_planning():
                seen, changed_at = state, time.time()
            elif time.time() - changed_at > quiet_s and self.sensors_idle_since(changed_at, unreachable_ticks=unreachable_ticks):
                if not allow_failures:
                    failed = [r.run_id for r in runs if r.status == DagsterRunStatus.FAILURE]
                    assert not failed, f"failed runs: {failed}; see {self.log_path}"
                return runs
            time.sleep(0.5)
        raise AssertionError(f"did not settle in {timeout_s}s; runs: {[(r.run_id, r.status) for r in self.runs()]}")

    def sensors_idle_since(self, t: float, ticks: int = 1, unreachable_ticks: bool = False) -> bool:
        """True when every sensor has ``ticks`` ticks that started after ``t`` and requested nothing."""
        states = self.instance.all_instigator_state(instigator_type=InstigatorType.SENSOR)
        if not states:
            return False
        for state in states:
            recent = self.instance.get_ticks(state.instigator_origin_id, state.selector_id, after=t, limit=10)
            failed = [t for t in recent if t.status == TickStatus.FAILURE
                      and not (unreachable_ticks and UNREACHABLE in str(t.error))]
            assert not failed, f"sensor {state.instigator_name} failed a tick: {[tick.error for tick in failed]}"
            if sum(tick.status == TickStatus.SKIPPED for tick in recent) < ticks:
                return False
        return True

    def backfill_planning(self) -> bool:
        """True while a requested backfill is not fully planned by the adapter sensor."""
        requested = backfill_requests(self.instance)
        if not requested:
            return False
        cursors = [s.instigator_data.cursor for s in self.instance.all_instigator_state()
                   if s.name == "adapter_retrain_sensor" and s.instigator_data]
        planned = json.loads(cursors[0]).get("backfills", {}) if cursors and cursors[0] else {}
        return any(planned.get(b) != "done" for b in requested)

    def new_runs(self, before: list, **kw) -> list:
        known = {r.run_id for r in before}
        return [r for r in self.settle(**kw) if r.run_id not in known]


def adapter_runs(runs: list) -> dict[str, set[str]]:
    """partition -> adapter assets trained over the given batch runs; each (partition, adapter) once."""
    out: dict[str, set[str]] = {}
    for run in runs:
        if run.job_name != ADAPTER_BATCH_JOB:
            continue
        config = run.run_config["ops"]["train_adapters"]["config"]
        for item in config["items"]:
            partition = f"{config['base_model']}|{item['user']}"
            trained = out.setdefault(partition, set())
            adapter = f"{item['mode']}/adapter"
            assert adapter not in trained, f"{partition}: {adapter} trained twice"
            trained.add(adapter)
    return out


def dataset_runs(runs: list) -> dict[str, set[str]]:
    """user -> source and dataset assets rebuilt over the given batch runs."""
    out: dict[str, set[str]] = {}
    for run in runs:
        if run.job_name != DATASET_BATCH_JOB:
            continue
        for change in run.run_config["ops"]["rebuild_datasets"]["config"]["users"]:
            keys = out.setdefault(change["user"], set())
            keys.update(f"sources/{s}" for s in change["sources"])
            keys.update(f"{m.name}/dataset" for m in modes_reading(set(change["sources"])))
    return out
