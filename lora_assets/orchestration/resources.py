"""Resources: where the embedded default keeps its files, and training knobs."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from lora_assets.data.change_feed import ChangeFeed
from lora_assets.data.sqs_feed import SqsChangeFeed
from lora_assets.data.user_store import UserStore
from lora_assets.paths import data_home
from lora_assets.storage import LocalObjectStore, ObjectStore, S3ObjectStore


class LoraAssetsHome(ConfigurableResource):
    """The data dir of the embedded default (user store, datasets, adapters, base-model cache)."""

    home: str = Field(default="", description="Data dir; empty means $LORA_ASSETS_HOME or .lora_assets/")
    train_steps: int = Field(
        default=0,
        description="Steps per adapter; 0 means $LORA_ASSETS_TRAIN_STEPS, else each mode's default",
    )

    @property
    def path(self) -> Path:
        return Path(self.home).expanduser().resolve() if self.home else data_home()


    drive_root: str = Field(default="", description="Users' drives; empty means <home>/drive")
    keep_versions: int = Field(default=3, description="Published versions kept per adapter")
    gate_margin: float = Field(
        default=float(os.environ.get("LORA_ASSETS_GATE_MARGIN", "0.01")),
        description="Publish only if held-out loss beats the base model's by at least this (nats)",
    )
    gate_tolerance: float = Field(
        default=float(os.environ.get("LORA_ASSETS_GATE_TOLERANCE", "0.0")),
        description="... and is at most this much worse than the published version's on the same data",
    )

    backend: str = Field(
        default=os.environ.get("LORA_ASSETS_BACKEND", "local"),
        description="'local' (folders + SQLite feed) or 's3' (S3 user store and drive, SQS feed)",
    )
    s3_bucket: str = Field(default=os.environ.get("LORA_ASSETS_S3_BUCKET", ""))
    s3_endpoint_url: str = Field(
        default=os.environ.get("LORA_ASSETS_S3_ENDPOINT_URL", ""),
        description="S3/SQS endpoint override (an S3-compatible store or a local test server)",
    )
    region_name: str = Field(default=os.environ.get("AWS_REGION", os.environ.get("AWS_DEFAULT_REGION", "us-east-1")))
    sqs_queue_url: str = Field(default=os.environ.get("LORA_ASSETS_SQS_QUEUE_URL", ""))
    sqs_dead_letter_url: str = Field(default=os.environ.get("LORA_ASSETS_SQS_DLQ_URL", ""))

    def _s3(self):
        from dagster_aws.s3 import S3Resource

        if not self.s3_bucket:
            raise ValueError("backend 's3' needs s3_bucket (LORA_ASSETS_S3_BUCKET)")
        return S3Resource(endpoint_url=self.s3_endpoint_url or None, region_name=self.region_name).get_client()

    def drive(self) -> ObjectStore:
        """Users' drives: ``<drive_root>/<user>/...`` locally, ``s3://bucket/drive/<user>/...``."""
        if self.backend == "s3":
            return S3ObjectStore(self._s3(), self.s3_bucket, "drive")
        return LocalObjectStore(Path(self.drive_root).expanduser() if self.drive_root else self.path / "drive")

    def datasets(self) -> ObjectStore:
        """Per-mode datasets: ``<home>/datasets/`` locally, ``s3://bucket/datasets/`` on S3."""
        if self.backend == "s3":
            return S3ObjectStore(self._s3(), self.s3_bucket, "datasets")
        return LocalObjectStore(self.path / "datasets")

    def store(self) -> UserStore:
        """The user store: ``<home>/users/`` locally, ``s3://bucket/users/`` on S3."""
        if self.backend == "s3":
            return UserStore(S3ObjectStore(self._s3(), self.s3_bucket, "users"))
        return UserStore(self.path / "users")

    def feed(self) -> ChangeFeed | SqsChangeFeed:
        """The change feed: SQLite in the data dir, or S3 notifications on SQS."""
        if self.backend == "s3":
            import boto3

            if not (self.sqs_queue_url and self.sqs_dead_letter_url):
                raise ValueError("backend 's3' needs sqs_queue_url and sqs_dead_letter_url")
            client = boto3.client("sqs", endpoint_url=self.s3_endpoint_url or None, region_name=self.region_name)
            return SqsChangeFeed(client, self.sqs_queue_url, self.sqs_dead_letter_url, key_prefix="users")
        return ChangeFeed(self.path / "change_feed.sqlite")

    def steps_override(self) -> int | None:
        return self.train_steps or int(os.environ.get("LORA_ASSETS_TRAIN_STEPS", "0")) or None
