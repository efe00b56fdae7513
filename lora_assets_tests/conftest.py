"""Shared fixtures: one data dir and one tiny base model per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_assets_tests.serve_harness import free_port, served  # noqa: F401  one server for the serve test modules


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh LORA_ASSETS_HOME for the whole session (base-model caches are built once)."""
    path = tmp_path_factory.mktemp("lora_assets_home")
    os.environ["LORA_ASSETS_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(home: Path):
    from lora_assets.training import TINY_BASE_MODEL, load_base_model

    return load_base_model(TINY_BASE_MODEL, home)


@pytest.fixture(scope="session")
def bf16_base(home: Path):
    """tiny-llama in bf16, the dtype a CUDA worker trains in, forced on this CPU."""
    from lora_assets.training import TINY_BASE_MODEL, load_base_model

    return load_base_model(TINY_BASE_MODEL, home, device="cpu", dtype="bf16")


@pytest.fixture(scope="session")
def synthetic_tables():
    """Sources of two synthetic users, generated once."""
    from lora_assets.data.synthetic import generate_user

    return {u: generate_user(u) for u in ("user-000", "user-001")}


@pytest.fixture(scope="session")
def aws(tmp_path_factory):
    """moto's server mode on 127.0.0.1: a real S3 + SQS endpoint, with a bucket whose user-store
    prefix notifies a queue, and a dead-letter queue. Yields the settings the app reads."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    bucket = "lora-assets-test"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName="lora-assets-changes")["QueueUrl"]
    dlq = sqs.create_queue(QueueName="lora-assets-changes-dead")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [
                {
                    "QueueArn": queue_arn,
                    "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"],
                    "Filter": {"Key": {"FilterRules": [{"Name": "prefix", "Value": "users/"}]}},
                }
            ]
        },
    )
    yield {
        "endpoint": endpoint, "bucket": bucket, "queue": queue, "dlq": dlq, "s3": s3, "sqs": sqs,
    }
    server.stop()


def _postgres_bin() -> Path | None:
    import glob

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's package) on 127.0.0.1 for the Dagster instance."""
    import shutil
    import subprocess
    import tempfile

    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed; .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="lora-assets-pg-", dir="/tmp"))
    data = root / "data"
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: use its own system user
        shutil.chown(root, "postgres")
        root.chmod(0o755)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run(
        [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w",
         "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"],
        check=True, capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
