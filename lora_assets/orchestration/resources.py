"""The one resource: a deployment's ``Settings`` (stores, feed, training knobs) for assets and ops.

Every field is optional: unset fields come from the environment when a run (or a sensor tick)
asks for ``settings()``, not when this module is imported, so the same definitions serve the
embedded default, the scale-out backend and tests that pass explicit values.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from lora_assets.settings import Settings


class LoraAssetsHome(ConfigurableResource):
    """Settings overrides; each unset field falls back to its env var (see ``lora_assets.settings``)."""

    home: str | None = Field(default=None, description="Data dir ($LORA_ASSETS_HOME, else .lora_assets/)")
    backend: str | None = Field(default=None, description="'local' or 's3' ($LORA_ASSETS_BACKEND)")
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    region: str | None = None
    sqs_queue_url: str | None = None
    sqs_dead_letter_url: str | None = None
    drive_root: str | None = None
    keep_versions: int | None = None
    gate_margin: float | None = None
    gate_confidence: float | None = None
    gate_noise: float | None = None
    gate_noise_floor: float | None = None
    gate_retrieval_k: int | None = None
    gate_require_retrieval: bool | None = None
    train_steps: int | None = None
    max_train_steps: int | None = Field(default=None, description="A ceiling on each mode's step budget: GPU time per adapter ($LORA_ASSETS_MAX_TRAIN_STEPS)")
    users_per_run: int | None = None
    feed_events_per_tick: int | None = None
    dataset_changes_per_tick: int | None = None
    fuse: int | None = None
    fusion: str | None = Field(default=None, description="Training variant: auto, sequential, interleaved, batched ($LORA_ASSETS_FUSION)")
    device: str | None = Field(default=None, description="auto, cpu or cuda ($LORA_ASSETS_DEVICE)")
    dtype: str | None = Field(default=None, description="auto, fp32, bf16 or fp16 ($LORA_ASSETS_DTYPE)")
    torch_threads: int | None = None
    max_attempts: int | None = None
    max_record_bytes: int | None = None
    max_field_chars: int | None = None
    max_list_items: int | None = None
    max_depth: int | None = None
    staged_grace_s: float | None = None
    state_url: str | None = Field(default=None, description="Per-user state table, a SQLAlchemy URL ($LORA_ASSETS_STATE_URL)")
    history_retention_days: float | None = None
    training_max_runtime_s: int | None = Field(
        default=None, description="Seconds after which a training run is failed and its work requested again "
        "($LORA_ASSETS_TRAINING_MAX_RUNTIME_S)")

    def settings(self) -> Settings:
        return Settings.from_env(**{k: v for k, v in self.model_dump().items() if v is not None})

    # Shorthands for the asset bodies and tests.
    @property
    def path(self) -> Path:
        return self.settings().home

    def store(self):
        return self.settings().store()

    def datasets(self):
        return self.settings().datasets()

    def drive(self):
        return self.settings().drive()

    def feed(self):
        return self.settings().feed()

    def state(self):
        return self.settings().state()
