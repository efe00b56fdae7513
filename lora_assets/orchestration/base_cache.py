"""One loaded base model per process, so every adapter op in a run shares a single load."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from lora_assets.settings import Settings

if TYPE_CHECKING:
    from lora_assets.training import LoadedBaseModel

_lock = threading.Lock()
_cached: dict[tuple[str, ...], LoadedBaseModel] = {}


def loaded_base_model(key: str, settings: Settings) -> LoadedBaseModel:
    """The base model ``key`` from the data dir, on the settings' device and dtype, loaded at most
    once per process (latest one kept).

    On S3 the base models are shared through the bucket: a worker whose data dir lacks the shared
    revision downloads it first, so a fresh pod or task finds every registered model.
    """
    from lora_assets.base_model_store import ensure_local
    from lora_assets.training import load_base_model, resolve_base_model

    home, shared = settings.home, settings.shared_base_models()
    if shared is not None:
        ensure_local(shared, key, home)
    ref = resolve_base_model(key, home)
    cache_key = (str(home), key, ref.revision, settings.device, settings.dtype)
    with _lock:
        if cache_key not in _cached:
            _cached.clear()  # keep one model resident: memory, not loads, is the scarce thing
            _cached[cache_key] = load_base_model(key, home, settings.device, settings.dtype)
        return _cached[cache_key]


def use_run_threads(settings: Settings) -> int:
    """Give torch the cores this run owns: ``torch_threads``, else every core of the machine.

    Training runs are serialized per machine (the run queue's ``lora_assets/training`` limit),
    so by default one run owns the cores; set LORA_ASSETS_TORCH_THREADS where a machine runs
    several training runs at once (cores / runs).
    """
    import torch

    threads = settings.torch_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    return threads
