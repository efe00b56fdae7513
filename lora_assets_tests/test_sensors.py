"""Sensor ticks, evaluated directly: cursors, coalescing, duplicates, poison events, retraining."""

from __future__ import annotations

import pytest
from dagster import (
    AssetMaterialization,
    instance_for_test,
    materialize,
)

from lora_assets.data.change_feed import ChangeEvent
from lora_assets.data.ingest import ingest
from lora_assets.orchestration.assets import (
    adapter_key,
    all_assets,
    dataset_key,
    source_key,
)
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.sensors import (
    adapter_retrain_sensor,
    change_feed_sensor,
    set_base_model_retired,
)
from lora_assets.orchestration.ticks import evaluate_tick


@pytest.fixture
def env(tmp_path):
    resources = LoraAssetsHome(home=str(tmp_path))
    with instance_for_test() as instance:
        yield instance, resources


def _mail(i: str, reply: str = "Sure!") -> dict:
    return {"id": i, "sender": "Sam", "subject": "Lunch?", "body": "Lunch tomorrow?", "reply": reply}


def _tick(sensor, instance, resources, cursor):
    return evaluate_tick(sensor, instance, resources, cursor)


def _selection(request) -> set[str]:
    return {k.to_user_string() for k in request.asset_selection}


def test_events_are_coalesced_per_user_and_only_affected_modes_are_selected(env):
    instance, res = env
    store, feed = res.store(), res.feed()
    for i in range(3):  # three batches of alice's mail: one dataset rebuild
        ingest(store, feed, "alice", "mail", [_mail(f"m{i}")])
    ingest(store, feed, "alice", "contacts", [{"id": "c1", "name": "Sam", "nickname": "sammy", "relation": "friend"}])
    ingest(store, feed, "bob", "browsing", [{"id": "b1", "query": "sourdough starter"}])

    result = _tick(change_feed_sensor, instance, res, None)

    assert result.cursor == "5"
    (added,) = result.dynamic_partitions_requests
    assert sorted(added.partition_keys) == ["alice", "bob"]
    by_user = {r.partition_key: r for r in result.run_requests}
    assert set(by_user) == {"alice", "bob"}
    assert _selection(by_user["alice"]) == {
        "sources/mail", "sources/contacts",
        "mail_reply/dataset", "message_reply/dataset", "photo_caption/dataset",
    }
    assert _selection(by_user["bob"]) == {"sources/browsing", "search_suggest/dataset"}


def test_events_are_acknowledged_only_after_the_cursor_moves_past_them(env):
    instance, res = env
    feed = res.feed()
    ingest(res.store(), feed, "alice", "mail", [_mail("m1")])
    first = _tick(change_feed_sensor, instance, res, None)
    # Crash before the tick was committed: the cursor never moved, the event is still there.
    again = _tick(change_feed_sensor, instance, res, None)
    assert [r.run_key for r in again.run_requests] == [r.run_key for r in first.run_requests]
    assert feed.pending_count() == 1
    # The committed cursor acknowledges: the next tick forgets the event and has nothing to do.
    after = _tick(change_feed_sensor, instance, res, first.cursor)
    assert feed.pending_count() == 0
    assert not after.run_requests and after.skip_message


def test_known_users_are_not_re_added(env):
    instance, res = env
    instance.add_dynamic_partitions("users", ["alice"])
    ingest(res.store(), res.feed(), "alice", "mail", [_mail("m1")])
    result = _tick(change_feed_sensor, instance, res, None)
    assert not result.dynamic_partitions_requests
    assert [r.partition_key for r in result.run_requests] == ["alice"]


def test_poison_events_are_set_aside_and_do_not_block_the_others(env, tmp_path):
    instance, res = env
    store, feed = res.store(), res.feed()
    garbage = feed.append("{not json")
    missing = feed.append(ChangeEvent("carol", "mail", seq=42, upserts=1).to_json())
    traversal = feed.append(ChangeEvent("../etc", "mail", seq=1).to_json())
    ingest(store, feed, "dave", "mail", [_mail("m1")])
    corrupt = ingest(store, feed, "erin", "mail", [_mail("m1")])
    segment = tmp_path / "users" / "erin" / "mail" / f"log-{corrupt.write.seq:012d}.parquet"
    segment.write_bytes(b"truncated")
    good = ingest(store, feed, "alice", "mail", [_mail("m1")])

    result = _tick(change_feed_sensor, instance, res, None)

    assert [r.partition_key for r in result.run_requests] == ["alice", "dave"]
    assert result.cursor == str(good.event_id)
    dead = {event_id: error for event_id, _payload, error in feed.dead_letters()}
    assert set(dead) == {garbage, missing, traversal, corrupt.event_id}
    assert "undecodable change event" in dead[garbage]
    assert "segment 42 does not exist" in dead[missing]
    assert "invalid user id" in dead[traversal]
    assert "unreadable" in dead[corrupt.event_id]
    # Set aside for good: the next tick neither re-fails on them nor re-requests anything.
    nxt = _tick(change_feed_sensor, instance, res, result.cursor)
    assert not nxt.run_requests


def _materialize_dataset(instance, res, user, mode="search_suggest", sources=("browsing",)):
    keys = [source_key(s) for s in sources] + [dataset_key(mode)]
    result = materialize(all_assets(), selection=keys, partition_key=user, instance=instance,
                         resources={"lora_home": res})
    assert result.success
    return instance.get_latest_materialization_event(dataset_key(mode)).asset_materialization


def _record_adapter(instance, mode, partition, dataset_version):
    instance.report_runless_asset_event(
        AssetMaterialization(adapter_key(mode), partition=partition, metadata={"dataset_version": dataset_version})
    )


def test_adapters_retrain_only_when_the_dataset_version_changes(env):
    instance, res = env
    instance.add_dynamic_partitions("users", ["alice", "bob"])
    instance.add_dynamic_partitions("base_models", ["tiny-llama", "smollm2-135m"])
    store, feed = res.store(), res.feed()
    ingest(store, feed, "alice", "browsing", [{"id": "b1", "query": "sourdough starter"}])
    version = _materialize_dataset(instance, res, "alice").tags["dagster/data_version"]

    first = _tick(adapter_retrain_sensor, instance, res, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["smollm2-135m|alice", "tiny-llama|alice"]
    assert all(_selection(r) == {"search_suggest/adapter", "search_suggest/published"} for r in first.run_requests)

    # Both adapters get trained on that version; the same content again trains nothing.
    for base in ("tiny-llama", "smollm2-135m"):
        _record_adapter(instance, "search_suggest", f"{base}|alice", version)
    _materialize_dataset(instance, res, "alice")
    same = _tick(adapter_retrain_sensor, instance, res, first.cursor)
    assert not same.run_requests

    # New content retrains, for active base models only.
    set_base_model_retired(instance, "smollm2-135m", retired=True)
    ingest(store, feed, "alice", "browsing", [{"id": "b2", "query": "rye flour"}])
    _materialize_dataset(instance, res, "alice")
    changed = _tick(adapter_retrain_sensor, instance, res, same.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["tiny-llama|alice"]


def test_a_dataset_version_already_being_trained_is_not_requested_twice(env):
    instance, res = env
    instance.add_dynamic_partitions("users", ["alice"])
    instance.add_dynamic_partitions("base_models", ["tiny-llama"])
    ingest(res.store(), res.feed(), "alice", "browsing", [{"id": "b1", "query": "sourdough starter"}])
    _materialize_dataset(instance, res, "alice")
    first = _tick(adapter_retrain_sensor, instance, res, None)
    (request,) = first.run_requests
    # The requested run is still training when a duplicate event rebuilds the same dataset.
    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    create_run_for_test(instance, job_name="__ASSET_JOB", status=DagsterRunStatus.STARTED,
                        tags={**request.tags, "dagster/partition": request.partition_key})
    _materialize_dataset(instance, res, "alice")
    dup = _tick(adapter_retrain_sensor, instance, res, first.cursor)
    assert not dup.run_requests


def test_feedback_changes_touch_only_the_modes_that_read_feedback(env):
    instance, res = env
    ingest(res.store(), res.feed(), "alice", "feedback", [
        {"id": "fb-1", "mode": "tone_rewrite", "prompt": "Rewrite: hi", "suggestion": "Hello.", "outcome": "rejected"}
    ])
    (request,) = _tick(change_feed_sensor, instance, res, None).run_requests
    assert _selection(request) == {"sources/feedback", "tone_rewrite/dataset"}
