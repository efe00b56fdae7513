"""Where lora_assets keeps its files on the embedded default.

One env var, ``LORA_ASSETS_HOME``, roots everything (base-model cache, user store, adapters),
so a test or a second deployment is just another directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_home() -> Path:
    """The data dir: ``$LORA_ASSETS_HOME``, else ``.lora_assets/`` in the project checkout."""
    env = os.environ.get("LORA_ASSETS_HOME")
    if env:
        home = Path(env).expanduser()
    elif (PROJECT_ROOT / "pyproject.toml").exists():
        home = PROJECT_ROOT / ".lora_assets"
    else:  # installed as a plain wheel: there is no project checkout to live under
        home = Path.home() / ".lora_assets"
    home.mkdir(parents=True, exist_ok=True)
    return home.resolve()
