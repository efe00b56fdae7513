"""Scale-out engines: S3 user store and drive, SQS change feed, Postgres instance, run launchers.

S3 and SQS are moto's server on 127.0.0.1 (bucket notifications to SQS included); Postgres is
Debian's server started by the suite. Sensor ticks go through ``evaluate_tick`` like the daemon's,
and the runs they request execute through ``materialize`` on the Postgres instance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dagster import (
    instance_for_test,
    materialize,
)

from lora_assets.data.ingest import ingest
from lora_assets.drive.publish import publish_adapter, read_current
from lora_assets.drive.sync import sync_device
from lora_assets.orchestration.assets import all_assets
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.sensors import adapter_retrain_sensor, change_feed_sensor
from lora_assets.orchestration.ticks import evaluate_tick
from lora_assets.storage import PreconditionFailed, S3ObjectStore

PROJECT = Path(__file__).resolve().parents[1]


def s3_home(aws, tmp_path, **kw) -> LoraAssetsHome:
    return LoraAssetsHome(
        home=str(tmp_path), backend="s3", s3_bucket=aws["bucket"], s3_endpoint_url=aws["endpoint"],
        sqs_queue_url=aws["queue"], sqs_dead_letter_url=aws["dlq"], **kw,
    )


def drain(aws, queue_key: str = "queue") -> list[dict]:
    out = []
    while True:
        msgs = aws["sqs"].receive_message(
            QueueUrl=aws[queue_key], MaxNumberOfMessages=10, MessageAttributeNames=["All"]
        ).get("Messages", [])
        if not msgs:
            return out
        for m in msgs:
            aws["sqs"].delete_message(QueueUrl=aws[queue_key], ReceiptHandle=m["ReceiptHandle"])
        out.extend(msgs)


def _mail(i: str, reply: str = "Sure!") -> dict:
    return {"id": i, "sender": "Sam", "subject": "Lunch?", "body": "Lunch tomorrow?", "reply": reply}


def test_s3_conditional_writes_create_once_and_replace_only_unchanged(aws):
    store = S3ObjectStore(aws["s3"], aws["bucket"], "cas-test")
    store.put_if("p/CURRENT", b"one", expected_etag=None)
    with pytest.raises(PreconditionFailed):
        store.put_if("p/CURRENT", b"again", expected_etag=None)  # If-None-Match: *
    _data, etag = store.get_with_etag("p/CURRENT")
    store.put_if("p/CURRENT", b"two", expected_etag=etag)  # If-Match
    with pytest.raises(PreconditionFailed):
        store.put_if("p/CURRENT", b"three", expected_etag=etag)
    assert store.get("p/CURRENT") == b"two"
    assert store.list("p") == ["p/CURRENT"]


def test_pointer_flip_retries_after_a_conditional_write_conflict(aws, tiny_base, synthetic_tables, tmp_path):
    from dataclasses import replace

    from lora_assets.adapters import job_for
    from lora_assets.modes import MODES, build_examples
    from lora_assets.training import train_adapters

    mode = MODES["search_suggest"]
    dataset = build_examples(mode, synthetic_tables["user-000"], "user-000")
    jobs = [replace(job_for(mode, "user-000", dataset, tmp_path / f"a{s}", steps=1), seed=s) for s in (0, 1)]
    train_adapters(jobs, tiny_base, progress=None)
    drive = S3ObjectStore(aws["s3"], aws["bucket"], "drive-conflict")
    first = publish_adapter(drive, "user-000", "tiny-llama", mode.name, jobs[0].output_dir)

    real_put_if, calls = drive.put_if, []

    def racing_put_if(key, data, expected_etag):
        calls.append(key)
        if len(calls) == 1:  # another writer re-points CURRENT between our read and our write
            current, etag = drive.get_with_etag(key)
            real_put_if(key, current.replace(b'"protocol"', b'"raced": true, "protocol"'), etag)
        return real_put_if(key, data, expected_etag)

    drive.put_if = racing_put_if
    second = publish_adapter(drive, "user-000", "tiny-llama", mode.name, jobs[1].output_dir)
    assert len(calls) == 2, "the conflicting write must be retried after re-reading"
    assert second.flipped and second.previous == first.version
    pointer, _ = read_current(drive, "user-000", "tiny-llama", mode.name)
    assert pointer["version"] == second.version and "raced" not in pointer


_tick = evaluate_tick


def test_s3_notifications_on_sqs_feed_the_change_sensor(aws, tmp_path):
    res = s3_home(aws, tmp_path)
    drain(aws)  # s3:TestEvent from configuring the notification, and earlier tests' writes
    drain(aws, "dlq")
    with instance_for_test() as instance:
        ingest(res.store(), res.feed(), "sam@example.com", "mail", [_mail("m1")])  # key: sam%40example.com
        ingest(res.store(), res.feed(), "sam@example.com", "contacts", [{"id": "c1", "name": "Sam"}])
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody="garbage, not an S3 event")
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=json.dumps({"Event": "s3:TestEvent"}))

        first = _tick(change_feed_sensor, instance, res, None)
        (request,) = first.run_requests
        assert request.partition_key == "sam@example.com"
        assert {k.to_user_string() for k in request.asset_selection} >= {
            "sources/mail", "sources/contacts", "mail_reply/dataset", "photo_caption/dataset"
        }
        (dead,) = drain(aws, "dlq")
        assert dead["Body"] == "garbage, not an S3 event"
        assert "undecodable SQS message" in dead["MessageAttributes"]["error"]["StringValue"]

        # Nothing is deleted until the cursor is committed: the next tick acknowledges.
        attrs = ["ApproximateNumberOfMessagesNotVisible"]
        in_flight = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue"], AttributeNames=attrs)
        assert int(in_flight["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) >= 2
        second = _tick(change_feed_sensor, instance, res, first.cursor)
        assert not second.run_requests
        in_flight = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue"], AttributeNames=attrs)
        assert int(in_flight["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) == 0


def _drive_ticks(instance, res, cursors: dict) -> list[tuple[str, frozenset[str]]]:
    """Tick both sensors and run what they ask for, until they ask for nothing."""
    executed = []
    for _ in range(6):
        requested = False
        for sensor in (change_feed_sensor, adapter_retrain_sensor):
            result = _tick(sensor, instance, res, cursors.get(sensor.name))
            for request in result.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
            for request in result.run_requests:
                requested = True
                keys = list(request.asset_selection)
                outcome = materialize(
                    all_assets(), selection=keys, partition_key=request.partition_key, instance=instance,
                    resources={"lora_home": res}, tags=request.tags,
                )
                assert outcome.success
                executed.append((request.partition_key, frozenset(k.to_user_string() for k in keys)))
            cursors[sensor.name] = result.cursor
        if not requested:
            return executed
    raise AssertionError("sensors did not settle")


def test_change_driven_scenario_on_s3_sqs_and_postgres(aws, postgres_url, tiny_base, home, synthetic_tables, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    res = s3_home(aws, data, train_steps=3, gate_margin=0.0, gate_tolerance=1.0)
    drain(aws)
    overrides = {"storage": {"postgres": {"postgres_url": postgres_url}}}
    with instance_for_test(overrides=overrides) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        for user in ("user-000", "user-001"):
            for source in ("mail", "contacts", "browsing"):
                ingest(res.store(), res.feed(), user, source, synthetic_tables[user][source].to_pylist())
        cursors: dict = {}
        seeded = _drive_ticks(instance, res, cursors)
        adapters = {p: s for p, s in seeded if "|" in p}
        assert set(adapters) == {"tiny-llama|user-000", "tiny-llama|user-001"}
        # Contacts also feed message_reply and photo_caption, but without messages or photos
        # their datasets are empty: nothing to train, so no adapter is requested for them.
        assert adapters["tiny-llama|user-000"] == {
            "mail_reply/adapter", "mail_reply/published", "search_suggest/adapter", "search_suggest/published",
        }
        device = tmp_path / "device"
        report = sync_device(res.drive(), "user-000", device, "tiny-llama")
        assert report.ok and sorted(m for m, _o, _n in report.changed) == ["mail_reply", "search_suggest"]
        assert res.drive().list("user-000/adapters/tiny-llama/mail_reply")  # really on S3
        assert res.datasets().list("user-000") == ["user-000/mail_reply.parquet", "user-000/message_reply.parquet",
                                                   "user-000/photo_caption.parquet", "user-000/search_suggest.parquet"]
        assert not (data / "datasets").exists()

        # A mail change for user-000 retrains and republishes exactly that adapter.
        ingest(res.store(), res.feed(), "user-000", "mail", [_mail("mail-new", "Totally up for lunch!!")])
        changed = _drive_ticks(instance, res, cursors)
        assert changed == [
            ("user-000", frozenset({"sources/mail", "mail_reply/dataset"})),
            ("tiny-llama|user-000", frozenset({"mail_reply/adapter", "mail_reply/published"})),
        ]
        assert [m for m, _o, _n in sync_device(res.drive(), "user-000", device, "tiny-llama").changed] == ["mail_reply"]

        # A duplicate delivery of that S3 event and a garbage message: no extra training, no stuck sensor.
        ingest(res.store(), res.feed(), "user-000", "mail", [_mail("mail-new", "Totally up for lunch!!")])
        raw = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=1, VisibilityTimeout=0)
        body = raw["Messages"][0]["Body"]
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=body)
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody="{not json")
        again = _drive_ticks(instance, res, cursors)
        assert all("|" not in partition for partition, _ in again), f"unexpected training: {again}"
        assert [p for p, _ in again] == ["user-000"]  # the duplicates coalesce into one dataset run
        assert any(m["Body"] == "{not json" for m in drain(aws, "dlq"))


@pytest.mark.parametrize("flavour, launcher", [("ecs", "dagster_aws.ecs.EcsRunLauncher"), ("k8s", "dagster_k8s.K8sRunLauncher")])
def test_production_instance_configs_parse(flavour, launcher, monkeypatch):
    import importlib

    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config

    env = {
        "DAGSTER_PG_HOST": "db", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "x",
        "DAGSTER_PG_DB": "dagster", "LORA_ASSETS_COMPUTE_LOG_BUCKET": "logs",
        "LORA_ASSETS_ECS_TASK_DEFINITION": "arn:aws:ecs:us-east-1:1:task-definition/lora-gpu:1",
        "LORA_ASSETS_IMAGE": "registry/lora-assets:1", "LORA_ASSETS_K8S_NAMESPACE": "lora",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config, _cls = dagster_instance_config(str(PROJECT / "deploy" / flavour), "dagster.yaml")
    assert config["storage"]["postgres"]["postgres_db"]["hostname"] == {"env": "DAGSTER_PG_HOST"}
    assert config["concurrency"]["pools"]["granularity"] == "run"
    module, cls_name = launcher.rsplit(".", 1)
    launcher_cls = getattr(importlib.import_module(module), cls_name)
    assert config["run_launcher"]["class"] == cls_name
    processed = process_config(launcher_cls.config_type(), config["run_launcher"]["config"])
    assert processed.success, processed.errors
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    assert process_config(S3ComputeLogManager.config_type(), config["compute_logs"]["config"]).success


def test_embedded_default_stays_the_default():
    assert os.environ.get("LORA_ASSETS_BACKEND") in (None, "local")
    res = LoraAssetsHome()
    assert res.backend == "local"
    assert type(res.feed()).__name__ == "ChangeFeed"
