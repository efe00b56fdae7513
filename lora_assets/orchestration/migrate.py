"""``lora-assets migrate``: fill the per-user state table from an existing deployment's event log.

A deployment from before the state table has every user's history only in per-user partitions
of the Dagster event log. This reads, page by page of registered users, the latest dataset,
adapter and published materialization of each partition (two indexed queries per asset and
page) and the gate verdict where it is not implied (an adapter published after it was trained
passed its gate), and writes the rows ``status`` and the sensors read. Nobody is retrained.
Idempotent: rows are upserted, so a second run only refreshes them. Datasets whose adapters are
not current yet are announced to the adapter sensor, which trains them as it would have.
"""

from __future__ import annotations

from collections.abc import Callable

from dagster import AssetCheckKey, DagsterInstance

from lora_assets.modes import MODES
from lora_assets.orchestration.internals import AssetCheckExecutionRecordStatus, PartitionKeyFilter
from lora_assets.orchestration.keys import GATE_CHECK, adapter_key, dataset_key, published_key
from lora_assets.orchestration.partitions import LEGACY_USERS_PARTITIONS, legacy_adapter_partition
from lora_assets.orchestration.recording import latest_materializations
from lora_assets.orchestration.registry import active_base_models

PAGE = 500


def _value(materialization, name: str):
    entry = materialization.metadata.get(name)
    return entry.value if entry is not None else None


def _gate(instance: DagsterInstance, mode: str, partition: str) -> dict | None:
    history = instance.event_log_storage.get_asset_check_execution_history(
        AssetCheckKey(adapter_key(mode), GATE_CHECK), limit=1, partition_filter=PartitionKeyFilter(key=partition),
        status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
    )
    for record in history:
        evaluation = record.event.dagster_event.event_specific_data
        return {"passed": evaluation.passed, **{k: v.value for k, v in evaluation.metadata.items()}}
    return None


def migrate_event_log(instance: DagsterInstance, settings, progress: Callable[[int], None] = lambda n: None) -> int:
    """Write the state rows of every registered user; returns how many users were read."""
    state = settings.state()
    bases = active_base_models(instance)
    cursor, seen = None, 0
    while True:
        page = instance.event_log_storage.get_paginated_dynamic_partitions(
            LEGACY_USERS_PARTITIONS, limit=PAGE, ascending=True, cursor=cursor)
        users = list(page.results)
        state.register(users)
        for mode in MODES:
            for user, record in latest_materializations(instance, dataset_key(mode), users).items():
                mat = record.asset_materialization
                if version := mat.tags.get("dagster/data_version"):
                    state.record_dataset(user, mode, version, int(_value(mat, "rows") or 0),
                                         int(_value(mat, "train_rows") or 0), record.run_id, record.timestamp,
                                         announce=False)
            for base in bases:
                partitions = {legacy_adapter_partition(base, u): u for u in users}
                trained = latest_materializations(instance, adapter_key(mode), list(partitions))
                published = latest_materializations(instance, published_key(mode), list(partitions))
                for partition, user in partitions.items():
                    _migrate_adapter(instance, state, base, user, mode, partition,
                                     trained.get(partition), published.get(partition))
                # What the old sensor had not trained yet is announced to the new one; the rest is not.
                for user, row in state.rows(mode, base, users).items():
                    if row["reason"] in ("never_trained", "dataset_changed", "new_data_after_withdrawal"):
                        state.announce(user, mode, row["dataset_version"], row["train_rows"])
        seen += len(users)
        progress(seen)
        if not page.has_more:
            return seen
        cursor = page.cursor


def _migrate_adapter(instance, state, base, user, mode, partition, adapter, published) -> None:
    if adapter is not None:
        mat = adapter.asset_materialization
        if _value(mat, "withdrawn"):
            state.record_withdrawn(base, user, mode, str(_value(mat, "reason") or "withdrawn"),
                                   _value(mat, "dataset_version"), adapter.run_id, adapter.timestamp)
        else:
            passed = published is not None and published.storage_id > adapter.storage_id and (
                _value(published.asset_materialization, "version") != "withdrawn")
            gate = {"passed": True} if passed else (_gate(instance, mode, partition) or {"passed": False})
            state.record_adapter(
                base, user, mode, trained_on=_value(mat, "dataset_version"),
                adapter_version=mat.tags.get("dagster/data_version"), steps=_value(mat, "steps"),
                training={k: v.value for k, v in mat.metadata.items() if k not in ("loss_curve", "path")},
                gate=gate, run_id=adapter.run_id, at=adapter.timestamp,
            )
    if published is not None and (adapter is None or published.storage_id > adapter.storage_id):
        version = _value(published.asset_materialization, "version")
        if version and version != "withdrawn":
            state.record_published(base, user, mode, version, published.run_id, published.timestamp)
