"""Base models shared through the object store, so a worker with an empty disk finds them.

``lora-assets base-model add`` on one machine registers a model (or converts a built-in one)
into that machine's data dir. On the S3 backend it is also shared: every file of the converted
model directory is uploaded under a content address, with a manifest of sha256s, and a pointer
names the current one per key::

    base_models/<key>/<address>/<file>        the model directory's files (immutable)
    base_models/<key>/<address>/manifest.json {"key", "revision", "files": {name: {sha256, size}}}
    base_models/<key>/CURRENT                 {"address", "revision", "manifest_sha256"}

``<address>`` is 16 hex chars of the manifest's sha256, so the same weights always land in the
same place. A run worker calls ``ensure_local`` before it resolves a key: when its data dir does
not have the shared revision, it downloads the files once, verifies every sha256, and installs
them atomically (built-in keys into their cache folder, so the SmolLM2 conversion is never
repeated; other keys as a registered local directory). The embedded default never needs this:
everything is in the one data dir. No Dagster here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from lora_assets.storage import ObjectStore
from lora_assets.training.base_models import (
    BUILTIN_BASE_MODELS,
    BaseModelError,
    BaseModelRef,
    register_base_model,
    resolve_base_model,
    sha256_file,
    validate_base_model_key,
)

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
ADDRESS_FILE = ".shared_address"  # in an installed copy: the address it was downloaded from


def share(objects: ObjectStore, key: str, home: Path) -> tuple[str, bool]:
    """Upload the local model directory of ``key`` (converting a built-in one first); returns
    (address, uploaded) - nothing is uploaded when the store already has these exact files."""
    ref = resolve_base_model(key, home)
    files = {
        str(p.relative_to(ref.path)): p for p in sorted(ref.path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ref.path).parts)  # .git, markers
    }
    manifest = {
        "key": key,
        "revision": ref.revision,
        "files": {name: {"sha256": sha256_file(p), "size": p.stat().st_size} for name, p in files.items()},
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
    address = manifest_sha[:16]
    uploaded = not objects.exists(f"{key}/{address}/{MANIFEST}")
    if uploaded:
        for name, path in files.items():
            objects.put(f"{key}/{address}/{name}", path.read_bytes())
        objects.put(f"{key}/{address}/{MANIFEST}", manifest_bytes)  # last: the version is complete
    pointer = {"address": address, "revision": ref.revision, "manifest_sha256": manifest_sha}
    objects.put(f"{key}/{CURRENT}", json.dumps(pointer, sort_keys=True).encode())
    return address, uploaded


def ensure_local(objects: ObjectStore, key: str, home: Path) -> BaseModelRef | None:
    """Make the shared version of ``key`` available in ``home``; None when it is not shared.

    A data dir that already holds that version (its address is recorded next to the files)
    downloads nothing. One process at a time installs a key (a file lock), so parallel steps on
    a fresh worker download it once.
    """
    validate_base_model_key(key)
    try:
        pointer = json.loads(objects.get(f"{key}/{CURRENT}"))
    except (FileNotFoundError, KeyError):
        return None
    models = home / "base_models"
    target = models / key if key in BUILTIN_BASE_MODELS else models / "shared" / key / pointer["address"]
    models.mkdir(parents=True, exist_ok=True)
    with (models / f".{key}.install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_address(target) != pointer["address"]:
            _download(objects, key, pointer, target)
        if key in BUILTIN_BASE_MODELS:
            return resolve_base_model(key, home)  # the cache marker came with the files
        try:
            registered = resolve_base_model(key, home)
        except BaseModelError:
            registered = None
        if registered is not None and registered.path == target.resolve():
            return registered
        return register_base_model(key, target, home)


def _installed_address(target: Path) -> str | None:
    try:
        return (target / ADDRESS_FILE).read_text().strip()
    except OSError:
        return None


def _download(objects: ObjectStore, key: str, pointer: dict, target: Path) -> None:
    prefix = f"{key}/{pointer['address']}"
    manifest_bytes = objects.get(f"{prefix}/{MANIFEST}")
    if hashlib.sha256(manifest_bytes).hexdigest() != pointer["manifest_sha256"]:
        raise BaseModelError(f"shared base model {key!r}: {prefix}/{MANIFEST} does not match its CURRENT pointer")
    manifest = json.loads(manifest_bytes)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        for name, meta in manifest["files"].items():
            data = objects.get(f"{prefix}/{name}")
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise BaseModelError(f"shared base model {key!r}: {prefix}/{name} does not match its manifest")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / ADDRESS_FILE).write_text(pointer["address"])
        if target.exists():  # an older version of a built-in's cache (under the install lock)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
