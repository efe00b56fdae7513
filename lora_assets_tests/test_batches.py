"""Batch runs: many users in one run, each partition recorded as a one-partition run records it."""

from __future__ import annotations

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetRecordsFilter,
    DagsterEventType,
    instance_for_test,
    partition_loading_context,
)
from dagster._core.storage.event_log.base import PartitionKeyFilter
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value

from lora_assets.data.user_store import write_user
from lora_assets.drive.publish import read_current
from lora_assets.orchestration.assets import adapter_key, dataset_key, published_key
from lora_assets.orchestration.partitions import adapter_partitions
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch

USERS = ("good", "nodata", "regress")


@pytest.fixture
def batch_env(tmp_path, home, tiny_base, synthetic_tables):
    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    # No regression tolerated: a 3-step retrain against a 60-step adapter must fail its gate.
    res = LoraAssetsHome(home=str(tmp_path), train_steps=3, gate_margin=0.0, gate_tolerance=0.0)
    store = res.store()
    write_user(store, "good", synthetic_tables["user-000"])
    write_user(store, "regress", synthetic_tables["user-001"])
    with instance_for_test() as instance:
        register_users(instance, list(USERS))
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        assert run_dataset_batch(instance, {u: ["browsing"] for u in ("good", "regress")}, res).success
        yield instance, res


def _partition_status(instance, key: AssetKey) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions, as the UI's partition view computes them."""
    with partition_loading_context(dynamic_partitions_store=instance):
        cache = get_and_update_asset_status_cache_value(instance, key, adapter_partitions)
        return (set(cache.deserialize_materialized_partition_subsets(adapter_partitions).get_partition_keys()),
                set(cache.deserialize_failed_partition_subsets(adapter_partitions).get_partition_keys()))


def test_a_bad_user_and_a_failed_gate_fail_only_their_own_partitions(batch_env):
    instance, res = batch_env
    # "regress" already has a well-trained published adapter: a 3-step retrain regresses against it.
    strong = LoraAssetsHome(home=res.home, train_steps=60, gate_margin=0.0)
    assert run_adapter_batch(instance, "tiny-llama", [("regress", "search_suggest")], strong).success
    res.store().write("regress", "browsing", deletes=["visit-00000"])  # new data: a retrain is due
    assert run_dataset_batch(instance, {"regress": ["browsing"]}, res).success

    result = run_adapter_batch(instance, "tiny-llama", [(u, "search_suggest") for u in USERS], res)

    assert not result.success  # the run fails, naming both partitions ...
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "search_suggest|tiny-llama|nodata" in failure.description
    assert "search_suggest|tiny-llama|regress" in failure.description
    # ... while the good user's adapter is trained, passes its gate and is published.
    drive = res.drive()
    assert read_current(drive, "good", "tiny-llama", "search_suggest") is not None
    mats = {
        (r.event_log_entry.dagster_event.asset_key.to_user_string(), r.event_log_entry.dagster_event.partition)
        for r in instance.get_records_for_run(result.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    }
    assert mats == {("search_suggest/adapter", "tiny-llama|good"), ("search_suggest/published", "tiny-llama|good"),
                    ("search_suggest/adapter", "tiny-llama|regress")}
    materialized, failed = _partition_status(instance, published_key("search_suggest"))
    assert "tiny-llama|good" in materialized
    assert failed == {"tiny-llama|nodata", "tiny-llama|regress"}
    materialized, failed = _partition_status(instance, adapter_key("search_suggest"))
    assert {"tiny-llama|good", "tiny-llama|regress"} <= materialized and failed == {"tiny-llama|nodata"}

    # Each partition has its own gate verdict, linked to the materialization it judged.
    history = {
        p: instance.event_log_storage.get_asset_check_execution_history(
            AssetCheckKey(adapter_key("search_suggest"), "eval_gate"), limit=1, partition_filter=PartitionKeyFilter(key=p)
        )[0]
        for p in ("tiny-llama|good", "tiny-llama|regress")
    }
    assert history["tiny-llama|good"].status.value == "SUCCEEDED"
    assert history["tiny-llama|regress"].status.value == "FAILED"
    for partition, record in history.items():
        latest = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=adapter_key("search_suggest"), asset_partitions=[partition]),
            limit=1,
        ).records[0]
        evaluation = record.event.dagster_event.event_specific_data
        assert evaluation.target_materialization_data.storage_id == latest.storage_id
        assert evaluation.partition == partition


def test_a_batch_records_data_versions_like_a_one_partition_run(batch_env):
    instance, res = batch_env
    assert run_adapter_batch(instance, "tiny-llama", [("good", "search_suggest")], res).success
    adapter = instance.get_latest_materialization_event(adapter_key("search_suggest")).asset_materialization
    dataset = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=dataset_key("search_suggest"), asset_partitions=["good"]), limit=1
    ).records[0]
    assert adapter.tags["dagster/data_version"] == adapter.metadata["sha256"].value
    assert adapter.tags["dagster/input_data_version/search_suggest/dataset"] == dataset.asset_materialization.tags["dagster/data_version"]
    assert adapter.tags["dagster/input_event_pointer/search_suggest/dataset"] == str(dataset.storage_id)
    assert adapter.metadata["dataset_version"].value == dataset.asset_materialization.tags["dagster/data_version"]


def test_a_retried_batch_does_not_retrain_what_is_already_published(batch_env):
    instance, res = batch_env
    items = [("good", "search_suggest"), ("regress", "search_suggest")]
    assert run_adapter_batch(instance, "tiny-llama", items, res).success
    before = instance.fetch_materializations(adapter_key("search_suggest"), limit=100).records
    again = run_adapter_batch(instance, "tiny-llama", items, res)  # e.g. the daemon's retry of a run that died late
    assert again.success
    assert instance.fetch_materializations(adapter_key("search_suggest"), limit=100).records == before
    planned = instance.get_records_for_run(again.run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION_PLANNED).records
    assert not planned, "nothing left to do is not announced as in progress"
