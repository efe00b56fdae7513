"""Shared fixtures: one data dir and one tiny base model per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


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
def synthetic_tables():
    """Sources of two synthetic users, generated once."""
    from lora_assets.data.synthetic import generate_user

    return {u: generate_user(u) for u in ("user-000", "user-001")}
