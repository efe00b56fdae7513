"""Sensors: change feed -> dataset runs, and changed datasets -> adapter runs.

Both do work proportional to what changed, never to how many users exist: the change sensor
reads feed events after its cursor; the adapter sensor reads dataset materializations after its
cursor (an indexed storage-id range). Declarative automation (``AutomationCondition.eager()``)
would do the adapter half too, but its tick evaluates every partition (~0.5 ms per user here,
a minute per tick at 100k users), so the project uses these two event-driven sensors instead.
"""

import hashlib
import json
import os
from collections import defaultdict

from dagster import (
    AssetRecordsFilter,
    AssetSelection,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.storage.dagster_run import NOT_FINISHED_STATUSES

from lora_assets.data.schemas import SOURCES, InvalidRecord, schema_for
from lora_assets.data.user_store import validate_user_id
from lora_assets.modes import MODES, Mode
from lora_assets.orchestration.assets import (
    adapter_key,
    dataset_key,
    published_key,
    source_key,
)
from lora_assets.orchestration.partitions import (
    adapter_partition_key,
    base_model_partitions,
    users_partitions,
)
from lora_assets.orchestration.resources import LoraAssetsHome

FEED_BATCH = 1000  # events per tick; the rest wait for the next tick
DATASET_BATCH = 1000  # dataset materializations per mode per tick
SENSOR_INTERVAL_S = int(os.environ.get("LORA_ASSETS_SENSOR_INTERVAL_S", "15"))
RETIRED_KEY = "lora_assets/retired_base_models"
DATA_VERSION_TAG = "dagster/data_version"


def modes_reading(sources: set[str]) -> list[Mode]:
    """The modes whose dataset depends on any of ``sources``, in declaration order."""
    return [m for m in MODES.values() if sources & set(m.sources)]


def retired_base_models(instance: DagsterInstance) -> set[str]:
    raw = instance.run_storage.get_cursor_values({RETIRED_KEY}).get(RETIRED_KEY)
    return set(json.loads(raw)) if raw else set()


def set_base_model_retired(instance: DagsterInstance, key: str, retired: bool) -> None:
    current = retired_base_models(instance)
    current = current | {key} if retired else current - {key}
    instance.run_storage.set_cursor_values({RETIRED_KEY: json.dumps(sorted(current))})


def active_base_models(instance: DagsterInstance) -> list[str]:
    retired = retired_base_models(instance)
    return [k for k in instance.get_dynamic_partitions(base_model_partitions.name) if k not in retired]


@sensor(
    name="change_feed_sensor",
    target=AssetSelection.assets(*(source_key(s) for s in SOURCES), *(dataset_key(m) for m in MODES)),
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Consumes the change feed: registers new users, coalesces events per user and source, "
        "and launches one run per user that re-materializes the changed sources and the "
        "datasets of exactly the modes that read them."
    ),
)
def change_feed_sensor(context: SensorEvaluationContext, lora_home: LoraAssetsHome) -> SensorResult:
    feed = lora_home.feed()
    # Events up to the committed cursor had their runs recorded with it: the feed forgets them
    # now. What this tick reads is acknowledged by the next tick, after this one is committed.
    deliveries, cursor = feed.consume(context.cursor, FEED_BATCH)
    if not deliveries:
        return SensorResult(skip_reason=SkipReason("no new change events"), cursor=cursor)

    store = lora_home.store()
    changed: dict[str, set[str]] = defaultdict(set)
    for delivery in deliveries:
        try:
            if delivery.error:
                raise ValueError(delivery.error)
            for event in delivery.events:
                validate_user_id(event.user)
                schema_for(event.source)
                if event.seq:
                    store.check_segment(event.user, event.source, event.seq)
        except (ValueError, OSError, InvalidRecord) as exc:
            feed.set_aside(delivery, str(exc))
            context.log.error(f"change event {delivery.ref[:40]} set aside (dead letter): {exc}")
            continue
        for event in delivery.events:
            changed[event.user].add(event.source)
    if not changed:
        return SensorResult(skip_reason=SkipReason("only test or poison events"), cursor=cursor)

    run_id_suffix = hashlib.sha256(cursor.encode()).hexdigest()[:16]
    known = context.instance.get_existing_dynamic_partitions(users_partitions.name, sorted(changed))
    new_users = sorted(set(changed) - set(known))  # one bounded query, however many users exist
    run_requests = []
    for user in sorted(changed):
        sources = changed[user]
        keys = [source_key(s) for s in sorted(sources)] + [dataset_key(m.name) for m in modes_reading(sources)]
        run_requests.append(
            RunRequest(
                run_key=f"changes:{user}:{run_id_suffix}",
                partition_key=user,
                asset_selection=keys,
                tags={"lora_assets/trigger": "change_feed", "lora_assets/sources": ",".join(sorted(sources))},
            )
        )
    return SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[users_partitions.build_add_request(new_users)] if new_users else [],
        cursor=cursor,
    )


def _dataset_version_tag(mode: str) -> str:
    return f"lora_assets/dataset_version.{mode}"


def adapter_is_current(instance: DagsterInstance, mode: str, partition: str, version: str) -> bool:
    """True if the adapter was trained on (or a live run is training it on) this dataset version."""
    latest = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=adapter_key(mode), asset_partitions=[partition]), limit=1
    ).records
    if latest:
        meta = latest[0].asset_materialization.metadata
        trained_on = meta.get("dataset_version")
        if trained_on is not None and trained_on.value == version:
            return True
    live = instance.get_run_records(
        RunsFilter(
            tags={"dagster/partition": partition, _dataset_version_tag(mode): version},
            statuses=list(NOT_FINISHED_STATUSES),
        ),
        limit=1,
    )
    return bool(live)


@sensor(
    name="adapter_retrain_sensor",
    target=AssetSelection.assets(*(adapter_key(m) for m in MODES), *(published_key(m) for m in MODES)),
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Watches dataset materializations; when a user's dataset has a data version its adapters "
        "were not trained on, launches one run per (base model, user) retraining those modes' "
        "adapters (and publishing the ones that pass the eval gate) for every active base model. "
        "Same content, no training."
    ),
)
def adapter_retrain_sensor(context: SensorEvaluationContext) -> SensorResult:
    instance = context.instance
    cursor = json.loads(context.cursor) if context.cursor else {}
    latest: dict[tuple[str, str], tuple[str, int]] = {}  # (user, mode) -> (version, storage id)
    run_finished: dict[str, bool] = {}
    for mode in MODES:
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=dataset_key(mode), after_storage_id=cursor.get(mode)),
            limit=DATASET_BATCH,
            ascending=True,
        ).records
        for record in records:
            # Wait for the dataset run to finish, so all the datasets it rebuilds for a user
            # lead to one adapter run rather than one per mode as they land.
            if record.run_id not in run_finished:
                run = instance.get_run_by_id(record.run_id)
                run_finished[record.run_id] = run is None or run.is_finished
            if not run_finished[record.run_id]:
                break
            version = record.asset_materialization.tags.get(DATA_VERSION_TAG)
            train_rows = record.asset_materialization.metadata.get("train_rows")
            if train_rows is not None and train_rows.value == 0:
                cursor[mode] = record.storage_id  # nothing to learn from yet: no adapter
                continue
            if record.partition_key and version:
                latest[(record.partition_key, mode)] = (version, record.storage_id)
            cursor[mode] = record.storage_id
    if not latest:
        return SensorResult(skip_reason=SkipReason("no new dataset materializations"), cursor=json.dumps(cursor))

    bases = active_base_models(instance)
    todo: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)  # (base, user) -> {mode: version}
    newest: dict[str, int] = {}  # user -> storage id of their newest dataset event this tick
    for (user, mode), (version, storage_id) in sorted(latest.items()):
        newest[user] = max(newest.get(user, 0), storage_id)
        for base in bases:
            partition = str(adapter_partition_key(base, user))
            if not adapter_is_current(instance, mode, partition, version):
                todo[(base, user)][mode] = version
    # The run key names the triggering event, not the version: a dataset that returns to an
    # older version must still retrain. Duplicates are stopped by adapter_is_current instead.
    run_requests = [
        RunRequest(
            run_key=f"retrain:{base}|{user}:{newest[user]}",
            partition_key=str(adapter_partition_key(base, user)),
            asset_selection=[k for m in sorted(modes) for k in (adapter_key(m), published_key(m))],
            tags={"lora_assets/trigger": "dataset_changed", **{_dataset_version_tag(m): v for m, v in modes.items()}},
        )
        for (base, user), modes in sorted(todo.items())
    ]
    return SensorResult(run_requests=run_requests, cursor=json.dumps(cursor))
