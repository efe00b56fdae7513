"""A burst of changed users through a running daemon: publish latency, runs, orchestration cost.

    .venv/bin/python benchmarks/burst.py                                  # 20 users, tiny-llama
    .venv/bin/python benchmarks/burst.py --base-model smollm2-135m --users 8
    .venv/bin/python benchmarks/burst.py --users 200 --steps 1            # orchestration capacity

Starts ``dagster-daemon`` (embedded default: SQLite instance, local stores, the project's
dagster.yaml) on a fresh DAGSTER_HOME and data dir, waits for its sensors to tick, then ingests
N synthetic users' mail and contacts through the public ingest API within a second, and waits
until every user's mail_reply adapter is published (the CURRENT pointer's time). Then it stops
the daemon and trains the same adapters again in this process with ``train_adapters`` on the
same datasets (the base-model load reported apart), so orchestration is the difference.

Printed: time to the first, median and last publish, the number of runs, the in-process
training time, the ratio and difference last-publish / training, and adapters published per
second (the orchestration capacity when ``--steps 1`` makes training cost almost nothing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_assets.adapters import job_for  # noqa: E402
from lora_assets.data.synthetic import generate_user, user_ids  # noqa: E402
from lora_assets.datasets import read_dataset  # noqa: E402
from lora_assets.drive.publish import read_current  # noqa: E402
from lora_assets.modes import MODES  # noqa: E402
from lora_assets.orchestration.runs import register_base_model_partition  # noqa: E402
from lora_assets.paths import data_home  # noqa: E402
from lora_assets.training import load_base_model, resolve_base_model, train_adapters  # noqa: E402
from lora_assets_tests.harness import Daemon  # noqa: E402

MODE = "mail_reply"


def wait_for_first_tick(daemon: Daemon, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s.name == "change_feed_sensor" and s.instigator_data and s.instigator_data.cursor
               for s in daemon.instance.all_instigator_state()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the daemon's sensors did not tick within {timeout_s}s; see {daemon.log_path}")


def publish_times(daemon: Daemon, base_model: str, users: list[str], timeout_s: float) -> dict[str, float]:
    """user -> epoch seconds of their adapter's publication (the CURRENT pointer's created_at)."""
    drive, seen = daemon.settings.drive(), {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < len(users) and time.monotonic() < deadline:
        for user in users:
            if user not in seen:
                found = read_current(drive, user, base_model, MODE)
                if found:
                    seen[user] = datetime.fromisoformat(found[0]["created_at"]).timestamp()
        time.sleep(0.5)
    if len(seen) < len(users):
        raise TimeoutError(f"{len(users) - len(seen)} adapters not published within {timeout_s}s; see {daemon.log_path}")
    return seen


def run_timing(daemon: Daemon, runs: list) -> dict[str, tuple[int, float, float]]:
    """Per job: runs, mean wall time of a run, mean gap between consecutive runs of that job."""
    records = {r.dagster_run.run_id: r for r in daemon.instance.get_run_records()}
    out = {}
    for job in sorted({r.job_name for r in runs}):
        spans = sorted((records[r.run_id].start_time, records[r.run_id].end_time) for r in runs
                       if r.job_name == job and records[r.run_id].start_time and records[r.run_id].end_time)
        if not spans:
            continue
        gaps = [max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:])]
        out[job] = (len(spans), statistics.mean(e - s for s, e in spans), statistics.mean(gaps) if gaps else 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--base-model", default="tiny-llama")
    parser.add_argument("--steps", type=int, default=0, help="steps per adapter (0: the mode's own budget)")
    parser.add_argument("--users-per-run", type=int, default=0, help="0: the default setting")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    resolve_base_model(args.base_model, data_home())  # the shared base-model cache, built once
    users = user_ids(args.users)
    env = {"LORA_ASSETS_SENSOR_INTERVAL_S": "5", "LORA_ASSETS_GATE_MARGIN": "0.0", "LORA_ASSETS_GATE_CONFIDENCE": "0.5"}
    env["LORA_ASSETS_TRAIN_STEPS"] = str(args.steps)
    if args.users_per_run:
        env["LORA_ASSETS_USERS_PER_RUN"] = str(args.users_per_run)
    tables = {u: generate_user(u) for u in users}

    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), data_home() / "base_models", env=env)
        try:
            register_base_model_partition(daemon.instance, args.base_model)
            daemon.start()
            wait_for_first_tick(daemon)
            start = time.time()
            for user in users:
                daemon.ingest(user, "mail", tables[user]["mail"].to_pylist())
                daemon.ingest(user, "contacts", tables[user]["contacts"].to_pylist())
            ingest_s = time.time() - start
            published = publish_times(daemon, args.base_model, users, args.timeout)
            daemon.settle(quiet_s=6, allow_failures=True)
            runs = daemon.runs()
        finally:
            daemon.stop()
        latency = sorted(t - start for t in published.values())
        timing = run_timing(daemon, runs)
        by_job = {j: sum(r.job_name == j for r in runs) for j in sorted({r.job_name for r in runs})}
        failed = [r.run_id for r in runs if r.status.value != "SUCCESS"]

        settings = daemon.settings
        t0 = time.perf_counter()
        base = load_base_model(args.base_model, settings.home)
        load_s = time.perf_counter() - t0
        jobs = []
        for user in users:
            df, _ = read_dataset(settings.datasets(), user, MODE)
            jobs.append(job_for(MODES[MODE], user, df, Path(tmp) / "inproc" / user, steps=args.steps or None))
        t0 = time.perf_counter()
        train_adapters(jobs, base, progress=None, fuse=settings.fuse)
        train_s = time.perf_counter() - t0

    print(f"\n{args.users} users' mail + contacts ingested in {ingest_s:.1f} s; {MODE} adapters on {args.base_model}, "
          f"{jobs[0].steps if args.steps else 'mode budget'} steps, users_per_run {settings.users_per_run}, "
          f"fuse {settings.fuse}")
    print(f"published after: first {latency[0]:.1f} s, median {statistics.median(latency):.1f} s, "
          f"last {latency[-1]:.1f} s")
    print(f"runs: {len(runs)} ({', '.join(f'{n} {j}' for j, n in by_job.items())})"
          + (f"; not successful: {failed}" if failed else ""))
    for job, (n, mean_s, gap_s) in timing.items():
        print(f"  {job}: {n} runs, {mean_s:.1f} s each on average, {gap_s:.1f} s on average from one run's end to the next one's start")
    print(f"in-process training of the same {len(jobs)} adapters: {train_s:.1f} s (+ {load_s:.1f} s base load)")
    print(f"last publish / training: {latency[-1] / train_s:.2f}x (last publish - training = {latency[-1] - train_s:.1f} s)")
    print(f"orchestration capacity: {len(users) / latency[-1]:.2f} adapters published per second")


if __name__ == "__main__":
    main()
