"""Resources: where the embedded default keeps its files, and training knobs."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from lora_assets.data.user_store import UserStore
from lora_assets.paths import data_home


class LoraAssetsHome(ConfigurableResource):
    """The data dir of the embedded default (user store, datasets, adapters, base-model cache)."""

    home: str = Field(default="", description="Data dir; empty means $LORA_ASSETS_HOME or .lora_assets/")
    train_steps: int = Field(default=0, description="Steps per adapter; 0 means each mode's default")

    @property
    def path(self) -> Path:
        return Path(self.home).expanduser().resolve() if self.home else data_home()

    def store(self) -> UserStore:
        return UserStore(self.path / "users")

    def steps_override(self) -> int | None:
        return self.train_steps or None
