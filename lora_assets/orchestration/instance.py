"""The Dagster instance the CLI talks to: $DAGSTER_HOME, by default .dagster_home/ in the checkout."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterInstance

from lora_assets.paths import PROJECT_ROOT, data_home


def ensure_dagster_home() -> Path:
    """Set DAGSTER_HOME if unset and make sure it holds the project's dagster.yaml."""
    env = os.environ.get("DAGSTER_HOME")
    if env:
        home = Path(env).expanduser().resolve()
    elif (PROJECT_ROOT / "pyproject.toml").exists():
        home = PROJECT_ROOT / ".dagster_home"
    else:
        home = data_home() / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    project_config = PROJECT_ROOT / "dagster.yaml"
    if not config.exists() and not config.is_symlink() and project_config.exists():
        config.symlink_to(project_config)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance() -> DagsterInstance:
    ensure_dagster_home()
    return DagsterInstance.get()
