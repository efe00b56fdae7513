"""Sensor ticks, evaluated directly: batching, cursors, coalescing, duplicates, poison events,
retraining, and requesting again what a failed or killed run did not finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa
from dagster import DagsterRunStatus, instance_for_test

from lora_assets.data.change_feed import ChangeEvent
from lora_assets.data.ingest import ingest
from lora_assets.definitions import defs
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, DATASET_BATCH_JOB
from lora_assets.orchestration.internals import create_run_for_test
from lora_assets.orchestration.registry import set_base_model_retired
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import run_dataset_batch
from lora_assets.orchestration.sensors import (
    adapter_retrain_sensor,
    change_feed_sensor,
)
from lora_assets_tests.ticks import evaluate_tick


@pytest.fixture
def env(tmp_path):
    resources = LoraAssetsHome(home=str(tmp_path))
    with instance_for_test() as instance:
        yield instance, resources


def _mail(i: str, reply: str = "Sure!") -> dict:
    return {"id": i, "sender": "Sam", "subject": "Lunch?", "body": "Lunch tomorrow?", "reply": reply}


def _tick(sensor, instance, resources, cursor):
    return evaluate_tick(sensor, instance, resources, cursor, defs)


def _users(request) -> dict[str, list[str]]:
    """user -> changed sources of a dataset batch request."""
    config = request.run_config["ops"]["rebuild_datasets"]["config"]
    return {c["user"]: c["sources"] for c in config["users"]}


def _items(request) -> set[tuple[str, str, str]]:
    """(base model, user, mode) of an adapter batch request."""
    config = request.run_config["ops"]["train_adapters"]["config"]
    return {(config["base_model"], i["user"], i["mode"]) for i in config["items"]}


def test_events_are_coalesced_per_user_into_one_batch_run(env):
    instance, res = env
    store, feed = res.store(), res.feed()
    for i in range(3):  # three batches of alice's mail: one dataset rebuild
        ingest(store, feed, "alice", "mail", [_mail(f"m{i}")])
    ingest(store, feed, "alice", "contacts", [{"id": "c1", "name": "Sam", "nickname": "sammy", "relation": "friend"}])
    last = ingest(store, feed, "bob", "browsing", [{"id": "b1", "query": "sourdough starter"}])

    result = _tick(change_feed_sensor, instance, res, None)

    assert json.loads(result.cursor)["feed"] == str(last.event_id)
    assert res.state().user_page(None, 10) == ["alice", "bob"]  # registered by the tick
    (request,) = result.run_requests
    assert request.job_name == DATASET_BATCH_JOB
    assert _users(request) == {"alice": ["contacts", "mail"], "bob": ["browsing"]}
    assert request.tags["lora_assets/users"] == "alice,bob"


def test_a_run_holds_at_most_users_per_run_users_and_only_those_that_changed(env, tmp_path):
    instance, _ = env
    res = LoraAssetsHome(home=str(tmp_path), users_per_run=2)
    res.state().register([f"u{i}" for i in range(10)])  # registered, unchanged
    for user in ("u2", "u5", "u7", "u8", "new"):
        ingest(res.store(), res.feed(), user, "browsing", [{"id": "b1", "query": "rye"}])

    result = _tick(change_feed_sensor, instance, res, None)

    batches = [sorted(_users(r)) for r in result.run_requests]
    assert batches == [["new", "u2"], ["u5", "u7"], ["u8"]]
    one = _tick(change_feed_sensor, instance, LoraAssetsHome(home=str(tmp_path), users_per_run=1), None)
    assert [sorted(_users(r)) for r in one.run_requests] == [["new"], ["u2"], ["u5"], ["u7"], ["u8"]]


def test_a_tick_reads_at_most_feed_events_per_tick_and_the_next_tick_reads_the_rest(env, tmp_path):
    instance, _ = env
    res = LoraAssetsHome(home=str(tmp_path), feed_events_per_tick=2)
    for user in ("ann", "ben", "cy"):
        ingest(res.store(), res.feed(), user, "browsing", [{"id": "b1", "query": "rye"}])

    first = _tick(change_feed_sensor, instance, res, None)
    second = _tick(change_feed_sensor, instance, res, first.cursor)

    assert [sorted(_users(r)) for r in first.run_requests] == [["ann", "ben"]]
    assert [sorted(_users(r)) for r in second.run_requests] == [["cy"]]


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
    res.state().register(["alice"])
    (registered,) = res.state().engine.connect().execute(sa.text(
        "select registered_at from lora_users")).fetchall()
    ingest(res.store(), res.feed(), "alice", "mail", [_mail("m1")])
    result = _tick(change_feed_sensor, instance, res, None)
    assert res.state().engine.connect().execute(sa.text(
        "select registered_at from lora_users")).fetchall() == [registered]
    assert [list(_users(r)) for r in result.run_requests] == [["alice"]]


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

    assert [sorted(_users(r)) for r in result.run_requests] == [["alice", "dave"]]
    assert json.loads(result.cursor)["feed"] == str(good.event_id)
    dead = {event_id: error for event_id, _payload, error in feed.dead_letters()}
    assert set(dead) == {garbage, missing, traversal, corrupt.event_id}
    assert "undecodable change event" in dead[garbage]
    assert "segment 42 does not exist" in dead[missing]
    assert "invalid user id" in dead[traversal]
    assert "unreadable" in dead[corrupt.event_id]
    # Set aside for good: the next tick neither re-fails on them nor re-requests anything.
    nxt = _tick(change_feed_sensor, instance, res, result.cursor)
    assert not nxt.run_requests


def _build_dataset(instance, res, user, mode="search_suggest", sources=("browsing",)) -> str:
    """Rebuild a user's datasets in a batch run; returns the ``mode`` dataset's version."""
    assert run_dataset_batch(instance, {user: list(sources)}, res).success
    return res.state().datasets_of(mode, [user])[user]["version"]


def _record_adapter(res, mode, base, user, dataset_version):
    res.state().record_adapter(base, user, mode, trained_on=dataset_version, adapter_version="sha", steps=1,
                               training={}, gate={"passed": True}, run_id=None)


def test_adapters_retrain_only_when_the_dataset_version_changes(env):
    instance, res = env
    res.state().register(["alice", "bob"])
    instance.add_dynamic_partitions("base_models", ["tiny-llama", "smollm2-135m"])
    store, feed = res.store(), res.feed()
    ingest(store, feed, "alice", "browsing", [{"id": "b1", "query": "sourdough starter"}])
    version = _build_dataset(instance, res, "alice")

    first = _tick(adapter_retrain_sensor, instance, res, None)
    assert all(r.job_name == ADAPTER_BATCH_JOB for r in first.run_requests)
    assert sorted(_items(r) for r in first.run_requests) == [
        {("smollm2-135m", "alice", "search_suggest")}, {("tiny-llama", "alice", "search_suggest")}
    ]

    # Both adapters get trained on that version; the same content again trains nothing.
    for base in ("tiny-llama", "smollm2-135m"):
        _record_adapter(res, "search_suggest", base, "alice", version)
    _build_dataset(instance, res, "alice")
    same = _tick(adapter_retrain_sensor, instance, res, first.cursor)
    assert not same.run_requests

    # New content retrains, for active base models only.
    set_base_model_retired(instance, "smollm2-135m", retired=True)
    ingest(store, feed, "alice", "browsing", [{"id": "b2", "query": "rye flour"}])
    _build_dataset(instance, res, "alice")
    changed = _tick(adapter_retrain_sensor, instance, res, same.cursor)
    assert [_items(r) for r in changed.run_requests] == [{("tiny-llama", "alice", "search_suggest")}]


def test_changed_users_of_one_tick_share_adapter_batch_runs(env, tmp_path):
    instance, _ = env
    res = LoraAssetsHome(home=str(tmp_path), users_per_run=2)
    users = ["ann", "ben", "cat"]
    res.state().register(users)
    instance.add_dynamic_partitions("base_models", ["tiny-llama"])
    for user in users:
        ingest(res.store(), res.feed(), user, "browsing", [{"id": "b1", "query": f"{user} bread"}])
    ingest(res.store(), res.feed(), "ann", "mail", [_mail("m1")])
    assert run_dataset_batch(instance, {u: ["browsing", "mail"] for u in users}, res).success

    result = _tick(adapter_retrain_sensor, instance, res, None)

    assert [_items(r) for r in result.run_requests] == [
        {("tiny-llama", "ann", "mail_reply"), ("tiny-llama", "ann", "search_suggest"),
         ("tiny-llama", "ben", "search_suggest")},
        {("tiny-llama", "cat", "search_suggest")},
    ]  # ben and cat have no mail: no mail_reply adapter for them


def test_a_tick_reads_at_most_dataset_changes_per_tick_and_later_ticks_read_the_rest(env, tmp_path):
    instance, _ = env
    users = ["ann", "ben", "cat"]
    LoraAssetsHome(home=str(tmp_path)).state().register(users)
    instance.add_dynamic_partitions("base_models", ["tiny-llama"])
    res = LoraAssetsHome(home=str(tmp_path), dataset_changes_per_tick=1)
    for user in users:
        ingest(res.store(), res.feed(), user, "browsing", [{"id": "b1", "query": f"{user} bread"}])
    assert run_dataset_batch(instance, {u: ["browsing"] for u in users}, res).success
    (everything,) = _tick(adapter_retrain_sensor, instance, LoraAssetsHome(home=str(tmp_path)), None).run_requests

    cursor, per_tick = None, []
    for _ in range(20):
        result = _tick(adapter_retrain_sensor, instance, res, cursor)
        if result.cursor == cursor:
            break
        cursor = result.cursor
        per_tick.append(set().union(*(_items(r) for r in result.run_requests)))

    assert all(len(items) <= 1 for items in per_tick), per_tick
    assert set().union(*per_tick) == _items(everything) and len(_items(everything)) == 3


def test_a_dataset_version_already_being_trained_is_not_requested_twice(env):
    instance, res = env
    res.state().register(["alice"])
    instance.add_dynamic_partitions("base_models", ["tiny-llama"])
    ingest(res.store(), res.feed(), "alice", "browsing", [{"id": "b1", "query": "sourdough starter"}])
    _build_dataset(instance, res, "alice")
    first = _tick(adapter_retrain_sensor, instance, res, None)
    (request,) = first.run_requests
    # The requested run is still training when a duplicate event rebuilds the same dataset.
    create_run_for_test(instance, job_name=ADAPTER_BATCH_JOB, status=DagsterRunStatus.STARTED,
                        run_config=request.run_config, tags=request.tags)
    _build_dataset(instance, res, "alice")
    dup = _tick(adapter_retrain_sensor, instance, res, first.cursor)
    assert not dup.run_requests


def test_feedback_changes_touch_only_the_modes_that_read_feedback(env):
    instance, res = env
    ingest(res.store(), res.feed(), "alice", "feedback", [
        {"id": "fb-1", "mode": "tone_rewrite", "prompt": "Rewrite: hi", "suggestion": "Hello.", "outcome": "rejected"}
    ])
    (request,) = _tick(change_feed_sensor, instance, res, None).run_requests
    assert _users(request) == {"alice": ["feedback"]}


def _died(instance, job_name, run_config, tags=None):
    """A batch run whose worker died: the run is marked failed, nothing else was recorded."""
    run = create_run_for_test(instance, job_name=job_name, status=DagsterRunStatus.STARTED,
                              run_config=run_config, tags=tags or {})
    instance.report_run_failed(run)
    return run


def test_the_users_of_a_dataset_run_that_died_are_requested_again_then_quarantined(env, tmp_path):
    instance, _ = env
    res = LoraAssetsHome(home=str(tmp_path), max_attempts=2)
    primed = _tick(change_feed_sensor, instance, res, None)  # a new sensor starts after old failures
    config = {"ops": {"rebuild_datasets": {"config": {"users": [{"user": "alice", "sources": ["mail"]}]}}}}
    dead = _died(instance, DATASET_BATCH_JOB, config)

    retry = _tick(change_feed_sensor, instance, res, primed.cursor)
    (request,) = retry.run_requests
    assert _users(request) == {"alice": ["mail"]}
    assert request.tags["lora_assets/attempt"] == "2" and request.tags["lora_assets/retry_of"] == dead.run_id
    assert not _tick(change_feed_sensor, instance, res, retry.cursor).run_requests  # requested once

    # The retry dies too: with max_attempts 2 the users are quarantined, not requested forever.
    _died(instance, DATASET_BATCH_JOB, config, tags={"lora_assets/attempt": "2"})
    assert not _tick(change_feed_sensor, instance, res, retry.cursor).run_requests


def test_a_run_the_daemon_will_retry_is_left_to_that_retry(env):
    instance, res = env
    primed = _tick(change_feed_sensor, instance, res, None)
    config = {"ops": {"rebuild_datasets": {"config": {"users": [{"user": "alice", "sources": ["mail"]}]}}}}
    run = create_run_for_test(instance, job_name=DATASET_BATCH_JOB, status=DagsterRunStatus.STARTED,
                              run_config=config, tags={"dagster/will_retry": "true"})
    instance.report_run_failed(run)
    assert not _tick(change_feed_sensor, instance, res, primed.cursor).run_requests


def test_a_user_whose_data_cannot_be_read_is_retried_then_quarantined(env, tmp_path):
    instance, _ = env
    res = LoraAssetsHome(home=str(tmp_path), max_attempts=2)
    ingest(res.store(), res.feed(), "good", "mail", [_mail("m1")])
    broken = ingest(res.store(), res.feed(), "bad", "mail", [_mail("m1")])
    tick = _tick(change_feed_sensor, instance, res, None)
    (request,) = tick.run_requests
    segment = tmp_path / "users" / "bad" / "mail" / f"log-{broken.write.seq:012d}.parquet"
    segment.write_bytes(b"not parquet")  # a disk error after the event was accepted

    result = run_dataset_batch(instance, _users(request), res, tags=request.tags)

    assert not result.success  # the run fails, naming the user ...
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "bad:" in failure.event_specific_data.error.to_string()
    assert set(res.state().datasets_of("mail_reply", ["good", "bad"])) == {"good"}  # ... and only theirs is missing
    # Not a failure of the data itself: requested again, for the bad user only ...
    retry = _tick(change_feed_sensor, instance, res, tick.cursor)
    (again,) = retry.run_requests
    assert _users(again) == {"bad": ["mail"]} and again.tags["lora_assets/attempt"] == "2"
    assert not run_dataset_batch(instance, _users(again), res, tags=again.tags).success
    # ... but not forever: after max_attempts it is quarantined (an error in the tick's log).
    assert not _tick(change_feed_sensor, instance, res, retry.cursor).run_requests


def test_adapters_a_dead_training_run_did_not_finish_are_requested_again(env):
    instance, res = env
    res.state().register(["alice", "bob"])
    instance.add_dynamic_partitions("base_models", ["tiny-llama"])
    primed = _tick(adapter_retrain_sensor, instance, res, None)
    items = [{"user": u, "mode": "search_suggest", "dataset_version": f"v-{u}"} for u in ("alice", "bob")]
    config = {"ops": {"train_adapters": {"config": {"base_model": "tiny-llama", "items": items}}}}
    run = create_run_for_test(instance, job_name=ADAPTER_BATCH_JOB, status=DagsterRunStatus.STARTED, run_config=config)
    res.state().record_published("tiny-llama", "alice", "search_suggest", "v1", run.run_id)  # alice got done
    instance.report_run_failed(run)  # then the worker died

    (request,) = _tick(adapter_retrain_sensor, instance, res, primed.cursor).run_requests
    assert _items(request) == {("tiny-llama", "bob", "search_suggest")}
    assert request.tags["lora_assets/attempt"] == "2"


@pytest.mark.parametrize("slots", [1, 3])
def test_a_backfill_keeps_each_training_slot_busy_with_one_run_waiting_behind_it(tmp_path, slots):
    from lora_assets.orchestration.registry import request_backfill

    queue = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    limits = {"runs": {"tag_concurrency_limits": [{"key": "lora_assets/training", "limit": slots}]}}
    with instance_for_test(overrides={"run_coordinator": queue, "concurrency": limits}) as instance:
        res = LoraAssetsHome(home=str(tmp_path), users_per_run=1, training_max_runtime_s=900)
        users = [f"u{i:02d}" for i in range(10)]
        res.state().register(users)
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        for user in users:
            ingest(res.store(), res.feed(), user, "browsing", [{"id": "b1", "query": f"{user} bread"}])
        assert run_dataset_batch(instance, {u: ["browsing"] for u in users}, res).success
        changes = _tick(adapter_retrain_sensor, instance, res, None)
        assert len(changes.run_requests) == 10 and all(r.tags["dagster/max_runtime"] == "900" for r in changes.run_requests)
        busy = {"ops": {"train_adapters": {"config": {"base_model": "other", "items": [
            {"user": "someone", "mode": "search_suggest", "dataset_version": "v"}]}}}}
        for _ in range(slots):  # another base model's training runs hold every slot
            create_run_for_test(instance, job_name=ADAPTER_BATCH_JOB, status=DagsterRunStatus.STARTED, run_config=busy)
        request_backfill(instance, res.settings(), "tiny-llama")

        tick = _tick(adapter_retrain_sensor, instance, res, changes.cursor)

        assert len(tick.run_requests) == slots, "one run waiting behind each running one, whatever the slots"
        assert all(r.tags["lora_assets/trigger"] == "backfill" and r.tags["dagster/max_runtime"] == "900"
                   for r in tick.run_requests)


@pytest.mark.parametrize("value, expected", [("7", "interval 7"), ("0", "must be >= 1"), ("soon", "is not a valid int")])
def test_the_sensor_interval_is_a_setting_the_code_location_reads_when_it_loads(value, expected):
    code = ("from lora_assets.definitions import defs\n"
            "print('interval', defs.resolve_sensor_def('change_feed_sensor').minimum_interval_seconds)")
    env = {**os.environ, "LORA_ASSETS_SENSOR_INTERVAL_S": value}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert expected in (done.stdout + done.stderr).strip().splitlines()[-1]
    assert (done.returncode == 0) == (value == "7")
    if value == "0":
        assert "sensor_interval_s (LORA_ASSETS_SENSOR_INTERVAL_S)" in done.stderr
