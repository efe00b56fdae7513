"""Resources: where the embedded default keeps its files, and training knobs."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from lora_assets.data.change_feed import ChangeFeed
from lora_assets.data.user_store import UserStore
from lora_assets.drive.store import LocalDrive
from lora_assets.paths import data_home


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

    def store(self) -> UserStore:
        return UserStore(self.path / "users")

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

    def drive(self) -> LocalDrive:
        return LocalDrive(Path(self.drive_root).expanduser() if self.drive_root else self.path / "drive")

    def feed(self) -> ChangeFeed:
        return ChangeFeed(self.path / "change_feed.sqlite")

    def steps_override(self) -> int | None:
        return self.train_steps or int(os.environ.get("LORA_ASSETS_TRAIN_STEPS", "0")) or None
