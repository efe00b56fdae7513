"""Planning a backfill of a new base model over many registered users.

    .venv/bin/python benchmarks/backfill_plan.py [--users 10000] [--users-per-run 32]

A fresh SQLite instance gets ``--users`` users and their dataset materializations: every user
has mail_reply training data, half have search_suggest data, and a tenth have a message_reply
dataset with no training example (contacts but no messages). Then it times
``lora-assets backfill``'s request (``request_backfill``) and the planning the adapter sensor
does for it, page after page (``plan_backfill_page``, as many users per page as the sensor
plans per tick when the training queue is empty), and prints the runs and adapters planned and
the (user, mode) pairs skipped for having no training data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dagster import AssetMaterialization, instance_for_test  # noqa: E402

from lora_assets.orchestration.assets import dataset_key  # noqa: E402
from lora_assets.orchestration.registry import request_backfill  # noqa: E402
from lora_assets.orchestration.sensors import MAX_QUEUED_TRAINING_RUNS, plan_backfill_page  # noqa: E402


def seed(instance, users: list[str]) -> int:
    events = 0
    for i, user in enumerate(users):
        datasets = [("mail_reply", 40)]
        if i % 2 == 0:
            datasets.append(("search_suggest", 25))
        if i % 10 == 0:
            datasets.append(("message_reply", 0))
        for mode, rows in datasets:
            instance.report_runless_asset_event(AssetMaterialization(
                dataset_key(mode), partition=user, metadata={"train_rows": rows},
                tags={"dagster/data_version": f"{mode}-{user}"},
            ))
            events += 1
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--users-per-run", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, instance_for_test(temp_dir=tmp) as instance:
        users = [f"u{i:07d}" for i in range(args.users)]
        for i in range(0, len(users), 10_000):
            instance.add_dynamic_partitions("users", users[i : i + 10_000])
        instance.add_dynamic_partitions("base_models", ["new-base"])
        t0 = time.perf_counter()
        events = seed(instance, users)
        print(f"seeded {args.users} users, {events} dataset materializations in {time.perf_counter() - t0:.0f} s")

        t0 = time.perf_counter()
        backfill_id = request_backfill(instance, "new-base")
        request_s = time.perf_counter() - t0

        page_users = MAX_QUEUED_TRAINING_RUNS * args.users_per_run
        runs = adapters = pages = 0
        skipped: dict[str, int] = {}
        position, slowest = None, 0.0
        t0 = time.perf_counter()
        while position != "done":
            start = time.perf_counter()
            pending, position, page_skipped = plan_backfill_page(instance, "new-base", position, page_users)
            slowest = max(slowest, time.perf_counter() - start)
            pages += 1
            requests = pending.requests(args.users_per_run, f"backfill:{backfill_id}:{pages}", {})
            runs += len(requests)
            adapters += sum(len(r.run_config["ops"]["train_adapters"]["config"]["items"]) for r in requests)
            for mode, n in page_skipped.items():
                skipped[mode] = skipped.get(mode, 0) + n
        plan_s = time.perf_counter() - t0

    print(f"backfill request (lora-assets backfill): {request_s * 1e3:.0f} ms")
    print(f"planning: {plan_s:.1f} s in {pages} pages of {page_users} users "
          f"(slowest page {slowest * 1e3:.0f} ms: one sensor tick's share)")
    print(f"runs: {runs} adapter_batch runs of up to {args.users_per_run} users, {adapters} adapters")
    print("skipped (no training data): " + ", ".join(f"{m} {n}" for m, n in sorted(skipped.items())))


if __name__ == "__main__":
    main()
