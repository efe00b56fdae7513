"""Resources: where the embedded default keeps its files, and training knobs."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from lora_assets.data.change_feed import ChangeFeed
from lora_assets.data.user_store import UserStore
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

    def feed(self) -> ChangeFeed:
        return ChangeFeed(self.path / "change_feed.sqlite")

    def steps_override(self) -> int | None:
        return self.train_steps or int(os.environ.get("LORA_ASSETS_TRAIN_STEPS", "0")) or None
