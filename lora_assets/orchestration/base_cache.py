"""One loaded base model per process, so every adapter op in a run shares a single load."""

from __future__ import annotations

import threading
from pathlib import Path

from lora_assets.training import LoadedBaseModel, load_base_model, resolve_base_model

_lock = threading.Lock()
_cached: dict[tuple[str, str, str], LoadedBaseModel] = {}


def loaded_base_model(key: str, home: Path) -> LoadedBaseModel:
    """The base model ``key`` from ``home``, loaded at most once per process (latest one kept)."""
    ref = resolve_base_model(key, home)
    cache_key = (str(home), key, ref.revision)
    with _lock:
        if cache_key not in _cached:
            _cached.clear()  # keep one model resident: memory, not loads, is the scarce thing
            _cached[cache_key] = load_base_model(key, home)
        return _cached[cache_key]
