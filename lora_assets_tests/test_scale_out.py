"""Scale-out engines: S3 user store and drive, SQS change feed, Postgres instance, run launchers.

S3 and SQS are moto's server on 127.0.0.1 (bucket notifications to SQS included); Postgres is
Debian's server started by the suite. The end-to-end scenario runs the real daemon on a Postgres
instance, with the code location on the S3 backend: sensors, batch runs and retries as deployed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import instance_for_test

from lora_assets.data.ingest import ingest
from lora_assets.data.synthetic import generate_user
from lora_assets.datasets import DatasetState, dataset_object_key, write_dataset
from lora_assets.definitions import defs
from lora_assets.drive.publish import publish_adapter, read_current
from lora_assets.drive.sync import sync_device
from lora_assets.modes import MODES, build_examples
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_base_model_partition
from lora_assets.orchestration.sensors import change_feed_sensor
from lora_assets_tests.ticks import evaluate_tick
from lora_assets.serving.retrieval import UserRetrievers
from lora_assets.storage import PreconditionFailed, S3ObjectStore
from lora_assets_tests.harness import Daemon, adapter_runs, dataset_runs

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
    dataset = build_examples(mode, synthetic_tables["user-000"])
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


def _tick(sensor, instance, res, cursor):
    return evaluate_tick(sensor, instance, res, cursor, defs)


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
        (change,) = request.run_config["ops"]["rebuild_datasets"]["config"]["users"]
        assert change == {"user": "sam@example.com", "sources": ["contacts", "mail"]}
        (dead,) = drain(aws, "dlq")
        assert dead["Body"] == "garbage, not an S3 event"
        assert "undecodable SQS message" in dead["MessageAttributes"]["error"]["StringValue"]

        # Nothing is deleted until the cursor is committed: the next tick acknowledges.
        attrs = ["ApproximateNumberOfMessagesNotVisible"]
        in_flight = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue"], AttributeNames=attrs)
        assert int(in_flight["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) >= 2
        assert res.feed().pending_count() >= 2
        second = _tick(change_feed_sensor, instance, res, first.cursor)
        assert not second.run_requests
        in_flight = aws["sqs"].get_queue_attributes(QueueUrl=aws["queue"], AttributeNames=attrs)
        assert int(in_flight["Attributes"]["ApproximateNumberOfMessagesNotVisible"]) == 0


class _CountingClient:
    """The boto3 S3 client, counting the downloads (``get_object`` calls) made through it."""

    def __init__(self, client) -> None:
        self.client, self.downloads = client, 0

    def get_object(self, **kw):
        self.downloads += 1
        return self.client.get_object(**kw)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_serving_rechecks_a_users_dataset_on_s3_by_etag_and_downloads_it_only_when_it_changed(aws):
    client = _CountingClient(aws["s3"])
    store = S3ObjectStore(client, aws["bucket"], "retrieval-refresh")
    mode = MODES["mail_reply"]
    df = build_examples(mode, generate_user("user-000"))
    assert store.etag(dataset_object_key("user-000", mode.name)) is None
    write_dataset(store, "user-000", mode.name, df, DatasetState(0, {}))
    now = [0.0]
    retrievers = UserRetrievers(store, refresh_s=10, capacity=4, clock=lambda: now[0])

    first = retrievers.get("user-000", mode.name)
    assert client.downloads == 1 and first is not None
    now[0] = 11  # past refresh_s, dataset unchanged: a HEAD request, the same retriever
    assert retrievers.get("user-000", mode.name) is first and client.downloads == 1

    dropped = df[df["split"] == "train"].iloc[0]["example_id"]
    write_dataset(store, "user-000", mode.name, df[df["example_id"] != dropped], DatasetState(1, {}))
    now[0] = 22  # the dataset moved: downloaded again, and the dropped example is gone
    second = retrievers.get("user-000", mode.name)
    assert client.downloads == 2 and second is not first
    assert dropped not in {ex.id for ex in second.train} and len(second.train) == len(first.train) - 1

    store.delete(dataset_object_key("user-000", mode.name))
    now[0] = 33  # a forgotten user's dataset: nothing to show, nothing downloaded
    assert retrievers.get("user-000", mode.name) is None and client.downloads == 2


def test_feed_command_shows_pending_events_and_dead_letters_on_sqs(aws, tmp_path):
    drain(aws)
    drain(aws, "dlq")
    aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=json.dumps({"Event": "s3:TestEvent"}))
    aws["sqs"].send_message(QueueUrl=aws["dlq"], MessageBody="{not json",
                            MessageAttributes={"error": {"DataType": "String", "StringValue": "undecodable SQS message"}})
    env = {**os.environ, **_s3_env(aws), "LORA_ASSETS_HOME": str(tmp_path / "data")}
    shown = subprocess.run([str(Path(sys.executable).with_name("lora-assets")), "feed"], env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "pending events: 1" in shown.stdout
    assert "undecodable SQS message" in shown.stdout and "{not json" in shown.stdout
    drain(aws)
    drain(aws, "dlq")


def _postgres_instance_yaml(postgres_url: str) -> str:
    return (PROJECT / "dagster.yaml").read_text() + f"\nstorage:\n  postgres:\n    postgres_url: {postgres_url}\n"


def _s3_env(aws) -> dict[str, str]:
    return {
        "LORA_ASSETS_BACKEND": "s3", "LORA_ASSETS_S3_BUCKET": aws["bucket"],
        "LORA_ASSETS_S3_ENDPOINT_URL": aws["endpoint"], "LORA_ASSETS_SQS_QUEUE_URL": aws["queue"],
        "LORA_ASSETS_SQS_DLQ_URL": aws["dlq"], "AWS_REGION": "us-east-1",
    }


@pytest.fixture
def s3_daemon(aws, postgres_url, home, tiny_base, tmp_path):
    """The real daemon on the scale-out engines: Postgres instance, S3 stores, SQS feed."""
    drain(aws)
    from lora_assets.state import StateStore
    from lora_assets.state_schema import metadata

    metadata.drop_all(StateStore(postgres_url).engine)  # the per-user state table on the same Postgres, fresh
    env = {**_s3_env(aws), "LORA_ASSETS_STATE_URL": postgres_url}
    d = Daemon(tmp_path, home / "base_models", env=env, instance_yaml=_postgres_instance_yaml(postgres_url))
    assert d.settings.state().engine.dialect.name == "postgresql"
    assert type(d.instance.run_storage).__name__ == "PostgresRunStorage"
    yield d
    d.stop()


def test_change_driven_scenario_on_s3_sqs_and_postgres_through_the_daemon(s3_daemon, aws, synthetic_tables, tmp_path):
    d = s3_daemon
    register_base_model_partition(d.instance, "tiny-llama")
    for user in ("user-000", "user-001"):
        for source in ("mail", "contacts", "browsing"):
            d.ingest(user, source, synthetic_tables[user][source].to_pylist())
    d.start()
    seeded = d.settle()
    # Contacts also feed message_reply and photo_caption, but without messages or photos
    # their datasets are empty: nothing to train, so no adapter is requested for them.
    assert adapter_runs(seeded) == {f"tiny-llama|{u}": {"mail_reply/adapter", "search_suggest/adapter"}
                                    for u in ("user-000", "user-001")}
    assert len([r for r in seeded if r.job_name == "adapter_batch"]) == 1  # both users in one batch
    device = tmp_path / "device"
    drive = d.settings.drive()
    report = sync_device(drive, "user-000", device, "tiny-llama")
    assert report.ok and sorted(m for m, _o, _n in report.changed) == ["mail_reply", "search_suggest"]
    assert drive.list("user-000/adapters/tiny-llama/mail_reply")  # really on S3
    assert d.settings.datasets().list("user-000") == [
        "user-000/mail_reply.parquet", "user-000/message_reply.parquet",
        "user-000/photo_caption.parquet", "user-000/search_suggest.parquet",
    ]
    assert not (d.data / "datasets").exists()

    # A mail change for user-000 retrains and republishes exactly that adapter.
    before = d.runs()
    d.ingest("user-000", "mail", [_mail("mail-new", "Totally up for lunch!!")])
    changed = d.new_runs(before)
    assert dataset_runs(changed) == {"user-000": {"sources/mail", "mail_reply/dataset"}}
    assert adapter_runs(changed) == {"tiny-llama|user-000": {"mail_reply/adapter"}}
    assert [m for m, _o, _n in sync_device(drive, "user-000", device, "tiny-llama").changed] == ["mail_reply"]

    # A duplicate delivery of that S3 event and a garbage message: no extra training, no stuck sensor.
    before = d.runs()
    d.ingest("user-000", "mail", [_mail("mail-new", "Totally up for lunch!!")])
    raw = aws["sqs"].receive_message(QueueUrl=aws["queue"], MaxNumberOfMessages=1, VisibilityTimeout=0)
    for message in raw.get("Messages", []):
        aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody=message["Body"])
    aws["sqs"].send_message(QueueUrl=aws["queue"], MessageBody="{not json")
    again = d.new_runs(before)
    assert adapter_runs(again) == {}, "the same content trains nothing"
    assert set(dataset_runs(again)) == {"user-000"}
    assert any(m["Body"] == "{not json" for m in drain(aws, "dlq"))

    # status on S3 + Postgres: fresh, with the published version the drive serves.
    shown = subprocess.run([str(Path(sys.executable).with_name("lora-assets")), "status", "--user", "user-000", "--json"],
                           env=d.env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    report = {a["mode"]: a for a in json.loads(shown.stdout)["adapters"]}
    pointer, _ = read_current(drive, "user-000", "tiny-llama", "mail_reply")
    assert report["mail_reply"]["state"] == "fresh" and report["mail_reply"]["published_version"] == pointer["version"]
    assert report["photo_caption"]["state"] == "no_data"

    # Forget user-001 while the daemon runs: S3 (store, datasets, drive), SQS and Postgres records.
    kept = {k: drive.get(k) for k in drive.list("user-000")}
    cli = [str(Path(sys.executable).with_name("lora-assets")), "forget", "--user", "user-001"]
    done = subprocess.run(cli, env=d.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nothing of user-001 is left" in done.stdout
    for prefix_store in (d.settings.store().objects, d.settings.datasets(), drive):
        assert prefix_store.list("user-001") == []
    state = d.settings.state()
    assert not state.is_registered("user-001") and state.count_user_rows("user-001") == 0
    for mode in ("mail_reply", "search_suggest"):
        assert set(state.rows(mode, "tiny-llama", ["user-000", "user-001"])) == {"user-000"}
    assert {k: drive.get(k) for k in drive.list("user-000")} == kept, "other users' objects stay byte-identical"
    before = d.runs()
    d.ingest("user-001", "mail", [_mail("after-forget")])  # a late producer: dropped and erased
    assert all("user-001" not in r.tags.get("lora_assets/users", "") for r in d.new_runs(before))
    assert d.settings.store().objects.list("user-001") == []



def test_a_worker_with_an_empty_data_dir_trains_on_a_base_model_registered_by_another_process(
    aws, postgres_url, home, tiny_base, synthetic_tables, tmp_path
):
    import shutil

    from dagster import DagsterInstance
    from lora_assets.orchestration.internals import InstanceRef

    from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch
    from lora_assets.training import read_adapter_metadata

    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(_postgres_instance_yaml(postgres_url))
    model = tmp_path / "models" / "custom"
    shutil.copytree(home / "base_models" / "tiny-llama", model)
    # An operator's machine registers a model directory it has locally ...
    operator = {**os.environ, **_s3_env(aws), "LORA_ASSETS_HOME": str(tmp_path / "operator"),
                "DAGSTER_HOME": str(dagster_home)}
    added = subprocess.run([str(Path(sys.executable).with_name("lora-assets")), "base-model", "add", "tiny-custom",
                            "--path", str(model)], env=operator, capture_output=True, text=True, timeout=300)
    assert added.returncode == 0, added.stderr
    assert f"shared with every worker at s3://{aws['bucket']}/base_models/tiny-custom/" in added.stdout
    shutil.rmtree(model)  # ... that no worker can see.

    # A run worker on a fresh disk: the data dir is empty, the model comes from S3, verified.
    worker = tmp_path / "worker"
    res = s3_home(aws, worker, train_steps=3, gate_margin=0.0)
    ingest(res.store(), res.feed(), "user-000", "browsing", synthetic_tables["user-000"]["browsing"].to_pylist())
    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    try:
        assert "tiny-custom" in instance.get_dynamic_partitions("base_models")
        register_users(res.settings(), ["user-000"])
        assert run_dataset_batch(instance, {"user-000": ["browsing"]}, res).success
        assert run_adapter_batch(instance, "tiny-custom", [("user-000", "search_suggest")], res).success
    finally:
        instance.dispose()
    (installed,) = (worker / "base_models" / "shared" / "tiny-custom").iterdir()
    revision = read_adapter_metadata(worker / "adapters" / "tiny-custom" / "user-000" / "search_suggest")["base_model_revision"]
    assert revision.startswith("dir-sha256:") and (installed / "model.safetensors").is_file()
    pointer, _ = read_current(res.drive(), "user-000", "tiny-custom", "search_suggest")
    assert pointer["version"]
    # A third machine re-adds (say, reactivates) the key by name alone: found on S3, not uploaded again.
    again = subprocess.run([str(Path(sys.executable).with_name("lora-assets")), "base-model", "add", "tiny-custom"],
                           env={**operator, "LORA_ASSETS_HOME": str(tmp_path / "third")},
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "(already there)" in again.stdout


@pytest.mark.parametrize("flavour, launcher", [("ecs", "dagster_aws.ecs.EcsRunLauncher"), ("k8s", "dagster_k8s.K8sRunLauncher")])
def test_production_instance_configs_parse(flavour, launcher, monkeypatch):
    import importlib

    from lora_assets.orchestration.internals import dagster_instance_config, process_config

    env = {
        "DAGSTER_PG_HOST": "db", "DAGSTER_PG_PORT": "5432", "DAGSTER_PG_USERNAME": "dagster", "DAGSTER_PG_PASSWORD": "x",
        "DAGSTER_PG_DB": "dagster", "LORA_ASSETS_COMPUTE_LOG_BUCKET": "logs",
        "LORA_ASSETS_ECS_TASK_DEFINITION": "arn:aws:ecs:us-east-1:1:task-definition/lora-gpu:1",
        "LORA_ASSETS_ECS_CLUSTER": "lora-assets",
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
    assert res.settings().backend == "local"
    assert type(res.feed()).__name__ == "ChangeFeed"
