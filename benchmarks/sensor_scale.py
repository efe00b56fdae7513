"""Tick time of the change path as the number of registered users grows.

    .venv/bin/python benchmarks/sensor_scale.py [--users 1000 10000 100000] [--events 100]

For each user count: a fresh SQLite Dagster instance with that many ``users`` partitions and one
base model, ``--events`` pending change events (one mail batch each, for distinct users), and
as many dataset materializations. It times one tick of each sensor through the same
``evaluate_tick`` path the daemon uses (partition-key validation included) and prints the
figures and the growth from the smallest to the largest user count (goal: flat).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dagster import (
    AssetMaterialization,
    DagsterInstance,
    instance_for_test,
)

from lora_assets.data.ingest import ingest
from lora_assets.definitions import defs
from lora_assets.orchestration.assets import dataset_key
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.sensors import adapter_retrain_sensor, change_feed_sensor
from lora_assets.orchestration.status import status
from lora_assets.orchestration.ticks import evaluate_tick


def tick(sensor, instance: DagsterInstance, resources: LoraAssetsHome, cursor: str | None):
    start = time.perf_counter()
    result = evaluate_tick(sensor, instance, resources, cursor, defs)
    return time.perf_counter() - start, result


def measure(n_users: int, n_events: int) -> tuple[float, float, float, int, int]:
    with tempfile.TemporaryDirectory() as tmp, instance_for_test(temp_dir=tmp) as instance:
        users = [f"u{i:06d}" for i in range(n_users)]
        for i in range(0, n_users, 10_000):
            instance.add_dynamic_partitions("users", users[i : i + 10_000])
        instance.add_dynamic_partitions("base_models", ["smollm2-135m"])
        resources = LoraAssetsHome(home=str(Path(tmp) / "data"))
        store, feed = resources.store(), resources.feed()
        step = max(1, n_users // n_events)
        changed = users[::step][:n_events]
        for user in changed:
            ingest(store, feed, user, "mail", [{"id": "m1", "sender": "Sam", "subject": "Hi", "body": "Hi?", "reply": "Hey!"}])
            instance.report_runless_asset_event(
                AssetMaterialization(dataset_key("mail_reply"), partition=user, metadata={"train_rows": 1},
                                     tags={"dagster/data_version": f"v-{user}"})
            )
        change_s, change = tick(change_feed_sensor, instance, resources, None)
        adapter_s, adapter = tick(adapter_retrain_sensor, instance, resources, None)
        start = time.perf_counter()  # what `lora-assets status --user U` reads (feed included)
        report = status(instance, feed, user=changed[-1])
        status_s = time.perf_counter() - start
        assert len(report.adapters) == 5 and report.adapters[0].user == changed[-1]
        return change_s, adapter_s, status_s, len(change.run_requests), len(adapter.run_requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--events", type=int, default=100)
    args = parser.parse_args()

    print(f"{'users':>8}  {'change tick':>12}  {'adapter tick':>12}  {'status --user':>13}  {'batch runs':>10}")
    rows = []
    for n in args.users:
        change_s, adapter_s, status_s, change_runs, adapter_runs = measure(n, args.events)
        rows.append((n, change_s, adapter_s, status_s))
        print(f"{n:>8}  {change_s * 1e3:>10.0f}ms  {adapter_s * 1e3:>10.0f}ms  {status_s * 1e3:>11.0f}ms  "
              f"{change_runs:>4} + {adapter_runs:<4}", flush=True)
    (n0, c0, a0, s0), (n1, c1, a1, s1) = rows[0], rows[-1]
    print(
        f"\n{args.events} events; from {n0} to {n1} users ({n1 / n0:.0f}x): change tick x{c1 / c0:.2f}, "
        f"adapter tick x{a1 / a0:.2f}, status of one user x{s1 / s0:.2f} (1.00 = flat)"
    )


if __name__ == "__main__":
    main()
