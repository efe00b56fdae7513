"""Publication of adapters to a user's drive: immutable versions plus an atomic CURRENT pointer.

Layout under the drive root::

    <user>/adapters/<base_model>/<mode>/<version>/adapter_model.safetensors
    <user>/adapters/<base_model>/<mode>/<version>/adapter_config.json
    <user>/adapters/<base_model>/<mode>/<version>/lora_assets.json
    <user>/adapters/<base_model>/<mode>/<version>/adapter.gguf       llama.cpp devices (when built)
    <user>/adapters/<base_model>/<mode>/<version>/manifest.json      written last
    <user>/adapters/<base_model>/<mode>/CURRENT                        {"version": ..., ...}

A version id is the content hash of the adapter files, so re-publishing the same adapter (a rerun
after a crash) lands in the same folder and completes it. Readers go CURRENT -> manifest ->
files and check every sha256; a version without a manifest is not finished and is never pointed
at. CURRENT only moves forward (to a version created later) and only by compare-and-swap.

Withdrawal: when the data an adapter learned from is gone (the user's dataset for the mode is
empty), CURRENT becomes a *tombstone* ``{"protocol": 1, "version": null, "withdrawn": true,
"reason": ..., "created_at": ...}`` and every version folder is deleted. A device that reads a
tombstone removes its installed copy of the mode. A later adapter replaces the tombstone like
any newer version.

Deletes: a version trained on a record the user deleted is removed from the drive when the
retrain that the delete causes is recorded (``purge_versions``), however recent it is; if CURRENT
points at one, it becomes a tombstone until an adapter without the record passes its gate.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_assets.data.user_store import validate_user_id
from lora_assets.storage import ObjectStore, PreconditionFailed
from lora_assets.training.base_models import validate_base_model_key

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "lora_assets.json")
# The device format, published when the adapter folder has it (versions from before it do not).
DEVICE_FILES = ("adapter.gguf",)
# Upload order: the metadata first, so even a half-uploaded version says what it was trained on
# (``purge_versions`` finds it after a delete).
UPLOAD_ORDER = ("lora_assets.json", "adapter_config.json", "adapter_model.safetensors", *DEVICE_FILES)
# What a device installs for each ``sync --format``; every format also gets the manifest.
FORMATS = {
    "peft": ADAPTER_FILES,
    "gguf": DEVICE_FILES,
    "all": ADAPTER_FILES + DEVICE_FILES,
}
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
DEFAULT_KEEP = 3
PROTOCOL = 1


class CorruptVersion(ValueError):
    """A published file is missing or does not match its manifest."""


@dataclass(frozen=True)
class PublishResult:
    version: str
    flipped: bool  # False when a newer version was already current (ours stays, unpointed)
    previous: str | None
    deleted_versions: tuple[str, ...]


def adapter_prefix(user: str, base_model: str, mode: str) -> str:
    validate_user_id(user)
    validate_base_model_key(base_model)
    if not mode.replace("_", "").isalnum():
        raise ValueError(f"invalid mode name {mode!r}")
    return f"{user}/adapters/{base_model}/{mode}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_current(drive: ObjectStore, user: str, base_model: str, mode: str) -> tuple[dict[str, Any], str] | None:
    """The CURRENT pointer's content and etag, or None when nothing is published."""
    key = f"{adapter_prefix(user, base_model, mode)}/{CURRENT}"
    found = drive.get_with_etag(key)
    if not found:
        return None
    try:
        pointer = json.loads(found[0])
        if not isinstance(pointer, dict) or not (isinstance(pointer.get("version"), str) or pointer.get("withdrawn") is True):
            raise ValueError("no version")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptVersion(f"{drive.uri(key)}: not a valid CURRENT pointer ({exc})") from None
    return pointer, found[1]


def read_manifest(drive: ObjectStore, user: str, base_model: str, mode: str, version: str) -> dict[str, Any]:
    return json.loads(drive.get(f"{adapter_prefix(user, base_model, mode)}/{version}/{MANIFEST}"))


def current_manifest(drive: ObjectStore, user: str, base_model: str, mode: str) -> dict[str, Any] | None:
    """The manifest CURRENT points at; None when nothing is published or it was withdrawn."""
    found = read_current(drive, user, base_model, mode)
    if not found or found[0].get("withdrawn"):
        return None
    return read_manifest(drive, user, base_model, mode, found[0]["version"])


def fetch_verified(drive: ObjectStore, prefix: str, manifest: dict[str, Any],
                   only: tuple[str, ...] | None = None) -> dict[str, bytes]:
    """Every file of a version (or those of ``only`` it lists), each checked against the
    manifest's size and sha256."""
    out = {}
    for name, meta in manifest["files"].items():
        if only is not None and name not in only:
            continue
        key = f"{prefix}/{manifest['version']}/{name}"
        try:
            data = drive.get(key)
        except FileNotFoundError:
            raise CorruptVersion(f"{key}: missing") from None
        if len(data) != meta["size"]:
            raise CorruptVersion(f"{key}: size {len(data)} != manifest {meta['size']} (truncated?)")
        if _sha256(data) != meta["sha256"]:
            raise CorruptVersion(f"{key}: sha256 mismatch (corrupted)")
        out[name] = data
    return out


def fetch_pointed(drive: ObjectStore, prefix: str, pointer: dict[str, Any], only: tuple[str, ...] | None = None,
                  ) -> tuple[bytes, dict[str, Any], dict[str, bytes]]:
    """The version a CURRENT pointer names, as every reader takes it: the manifest checked against
    the pointer's hash, then each file against the manifest (those of ``only`` it lists, when
    given: a reader's format). Returns (manifest bytes, manifest, files)."""
    key = f"{prefix}/{pointer['version']}/{MANIFEST}"
    try:
        manifest_bytes = drive.get(key)
    except FileNotFoundError:
        raise CorruptVersion(f"{key}: missing") from None
    if _sha256(manifest_bytes) != pointer.get("manifest_sha256"):
        raise CorruptVersion(f"{key}: does not match the CURRENT pointer")
    manifest = json.loads(manifest_bytes)
    return manifest_bytes, manifest, fetch_verified(drive, prefix, manifest, only)


def publish_adapter(
    drive: ObjectStore,
    user: str,
    base_model: str,
    mode: str,
    adapter_dir: Path,
    keep: int = DEFAULT_KEEP,
    extra: dict[str, Any] | None = None,
    before_flip: Callable[[str], None] | None = None,
) -> PublishResult:
    """Upload the adapter as an immutable version, then move CURRENT to it (if it is newer).

    ``before_flip`` is called between the upload and the pointer flip (tests simulate a crash).
    """
    prefix = adapter_prefix(user, base_model, mode)
    names = ADAPTER_FILES + tuple(n for n in DEVICE_FILES if (Path(adapter_dir) / n).is_file())
    blobs = {name: (Path(adapter_dir) / name).read_bytes() for name in names}
    version = _sha256(b"".join(_sha256(blobs[n]).encode() for n in names))[:16]
    created_at = datetime.now(timezone.utc).isoformat()
    manifest_key = f"{prefix}/{version}/{MANIFEST}"
    if drive.exists(manifest_key):
        manifest_bytes = drive.get(manifest_key)
        manifest = json.loads(manifest_bytes)
        fetch_verified(drive, prefix, manifest)  # a complete earlier upload: reuse it
    else:
        meta = json.loads(blobs["lora_assets.json"])
        manifest = {
            "protocol": PROTOCOL,
            "version": version,
            "user": user,
            "base_model": base_model,
            "base_model_revision": meta.get("base_model_revision"),
            "mode": mode,
            "dataset_version": meta.get("dataset_version"),
            "metrics": meta.get("metrics", {}),
            "created_at": created_at,
            "files": {n: {"sha256": _sha256(b), "size": len(b)} for n, b in blobs.items()},
            **(extra or {}),
        }
        manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
        for name in (n for n in UPLOAD_ORDER if n in blobs):
            drive.put(f"{prefix}/{version}/{name}", blobs[name])
        drive.put(manifest_key, manifest_bytes)
    if before_flip is not None:
        before_flip(version)
    pointer = {
        "version": manifest["version"],
        "manifest_sha256": _sha256(manifest_bytes),
        "created_at": manifest["created_at"],
        "protocol": PROTOCOL,
    }
    flipped, previous = _flip_current(drive, prefix, pointer)
    deleted = apply_retention(drive, user, base_model, mode, keep)
    return PublishResult(version, flipped, previous, tuple(deleted))


@dataclass(frozen=True)
class WithdrawResult:
    flipped: bool  # False when the pointer already was a tombstone (or a newer version won)
    previous: str | None
    deleted_versions: tuple[str, ...]


def withdraw_adapter(drive: ObjectStore, user: str, base_model: str, mode: str, reason: str) -> WithdrawResult:
    """Replace CURRENT with a tombstone and delete every version: devices uninstall the mode."""
    prefix = adapter_prefix(user, base_model, mode)
    try:
        found = read_current(drive, user, base_model, mode)
    except CorruptVersion:
        found = None
    if found and found[0].get("withdrawn"):
        flipped, previous = False, None
    else:
        flipped, previous = _flip_current(drive, prefix, _tombstone(reason))
    deleted = [v for v, _created, _done in list_versions(drive, user, base_model, mode)]
    _delete_versions(drive, prefix, deleted)
    return WithdrawResult(flipped, previous, tuple(deleted))


def _tombstone(reason: str) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": None, "withdrawn": True, "reason": reason,
            "created_at": datetime.now(timezone.utc).isoformat()}


def learned_deleted(metadata: Any, live_examples: frozenset[str]) -> bool:
    """Whether an adapter's ``lora_assets.json`` lists a training example that is not in
    ``live_examples`` (the dataset's training ids now): it learned a record deleted since.
    Metadata that says nothing of what it was trained on: False (cannot tell)."""
    trained = metadata.get("trained_examples") if isinstance(metadata, dict) else None
    return isinstance(trained, dict) and not set(trained) <= live_examples


def _flip_current(drive: ObjectStore, prefix: str, pointer: dict[str, Any]) -> tuple[bool, str | None]:
    """Compare-and-swap CURRENT to ``pointer`` unless it already is that or something newer."""
    key = f"{prefix}/{CURRENT}"
    for _attempt in range(20):
        found = drive.get_with_etag(key)
        current = _parse_pointer(found[0]) if found else None
        if current and current.get("version") == pointer["version"] and current.get("withdrawn") == pointer.get("withdrawn"):
            return False, current.get("version")
        if current and str(current.get("created_at", "")) > pointer["created_at"]:
            return False, current.get("version")  # a newer version won the race; keep it
        try:
            drive.put_if(key, json.dumps(pointer, sort_keys=True).encode(), found[1] if found else None)
        except PreconditionFailed:
            continue  # someone flipped in between: re-read and decide again
        return True, current.get("version") if current else None
    raise PreconditionFailed(f"{key}: gave up after 20 conflicting writers")


def _parse_pointer(raw: bytes) -> dict[str, Any] | None:
    """A CURRENT pointer's content; None when it is damaged (it is then overwritten)."""
    try:
        pointer = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return pointer if isinstance(pointer, dict) else None


def list_versions(drive: ObjectStore, user: str, base_model: str, mode: str) -> list[tuple[str, str, bool]]:
    """(version, created_at, complete) for every version folder, oldest first."""
    prefix = adapter_prefix(user, base_model, mode)
    versions: dict[str, bool] = {}
    for key in drive.list(prefix):
        parts = key[len(prefix) + 1 :].split("/")
        if len(parts) == 2:
            versions[parts[0]] = versions.get(parts[0], False) or parts[1] == MANIFEST
    out = []
    for version, complete in versions.items():
        created = ""
        if complete:
            try:
                created = str(read_manifest(drive, user, base_model, mode, version)["created_at"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                pass  # a damaged manifest sorts oldest: retention removes it first
        out.append((version, created, complete))
    return sorted(out, key=lambda v: v[1])


def apply_retention(drive: ObjectStore, user: str, base_model: str, mode: str, keep: int) -> list[str]:
    """Delete complete versions beyond the newest ``keep``; never the current one.

    The manifest goes first, so a half-deleted version reads as unfinished, not as corrupt.
    Unfinished uploads are left for a rerun to complete.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    current = _current_version(drive, user, base_model, mode)
    complete = [v for v, _created, done in list_versions(drive, user, base_model, mode) if done]
    doomed = [v for v in complete[: max(0, len(complete) - keep)] if v != current]
    _delete_versions(drive, adapter_prefix(user, base_model, mode), doomed)
    return doomed


def _current_version(drive: ObjectStore, user: str, base_model: str, mode: str) -> str | None:
    try:
        found = read_current(drive, user, base_model, mode)
    except CorruptVersion:
        return None
    return found[0].get("version") if found else None


def _delete_versions(drive: ObjectStore, prefix: str, versions: Sequence[str]) -> None:
    """The manifest goes first, so a half-deleted version reads as unfinished, not as corrupt."""
    for version in versions:
        drive.delete(f"{prefix}/{version}/{MANIFEST}")
        for key in drive.list(f"{prefix}/{version}"):
            drive.delete(key)


@dataclass(frozen=True)
class PurgeResult:
    deleted_versions: tuple[str, ...]
    current_deleted: bool  # CURRENT pointed at one of them: it is now a tombstone


def purge_versions(drive: ObjectStore, user: str, base_model: str, mode: str, live_examples: frozenset[str],
                   reason: str) -> PurgeResult:
    """Delete every version, finished or not, trained on an example that is no longer in the
    user's dataset (``live_examples``: its training example ids), so a delete leaves no copy of
    what it removed on the drive. If CURRENT points at one, it becomes a tombstone (``reason``)
    and devices uninstall the mode; the next adapter that passes its gate replaces it.

    What a version was trained on is its ``lora_assets.json``'s ``trained_examples``; a version
    without one (unreadable, or uploaded before it was recorded) is kept.
    """
    prefix = adapter_prefix(user, base_model, mode)
    doomed = []
    for version, _created, _complete in list_versions(drive, user, base_model, mode):
        try:
            metadata = json.loads(drive.get(f"{prefix}/{version}/lora_assets.json"))
        except (FileNotFoundError, ValueError, UnicodeDecodeError):
            continue
        if learned_deleted(metadata, live_examples):
            doomed.append(version)
    if not doomed:
        return PurgeResult((), False)
    current = _current_version(drive, user, base_model, mode)
    if current in doomed:
        _flip_current(drive, prefix, _tombstone(reason))
    _delete_versions(drive, prefix, doomed)
    return PurgeResult(tuple(doomed), current in doomed)
