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


# A folder rewritten in place (an adapter's working copy) is written to a staging sibling and
# renamed over, the previous one moved aside first: a process killed in between leaves these
# hidden siblings, which nothing reads and a delete must still remove (``unfinished_writes``).
def staging_prefix(folder: Path) -> str:
    """The name prefix of the staging siblings a new ``folder`` is written into."""
    return f".{folder.name}-"


def moved_aside(folder: Path) -> Path:
    """Where the previous ``folder`` waits while the new one is renamed into place."""
    return folder.with_name(f".{folder.name}.old-{os.getpid()}")


def unfinished_writes(folder: Path) -> list[Path]:
    """The staging and moved-aside siblings a killed rewrite of ``folder`` left."""
    if not folder.parent.is_dir():
        return []
    patterns = (f"{staging_prefix(folder)}*", f".{folder.name}.old-*")  # moved_aside's, any pid
    return [p for pattern in patterns for p in folder.parent.glob(pattern)]
