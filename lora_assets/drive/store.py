"""Drive storage: immutable objects plus small pointers that change only by compare-and-swap.

The publication protocol needs exactly two primitives: write an object that never changes
again, and replace a pointer only if it still holds what we read (S3: ``If-Match`` /
``If-None-Match``; here: a per-pointer lock, a compare, and ``os.replace``). ``LocalDrive`` is the
embedded default, a folder per user.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_KEY_RE = re.compile(r"^[A-Za-z0-9@._-]+(/[A-Za-z0-9@._-]+)*$")


class PointerConflict(RuntimeError):
    """The pointer changed between read and write; re-read and decide again."""


def etag_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Drive(Protocol):
    """What publication and sync need from a storage backend."""

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def get_pointer(self, key: str) -> tuple[bytes, str] | None: ...
    def put_pointer(self, key: str, data: bytes, expected_etag: str | None) -> None: ...


class LocalDrive:
    """A drive in a local folder: ``<root>/<user>/adapters/...``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"invalid drive key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        """Write an object atomically (temp file + rename, fsync'd)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"drive object {key!r} not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys of every object under ``prefix`` (a folder), sorted."""
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.root))
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop folders emptied by the delete, up to the root
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def get_pointer(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, etag_of(data)

    def put_pointer(self, key: str, data: bytes, expected_etag: str | None) -> None:
        """Replace the pointer only if its current etag is ``expected_etag`` (None: absent)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get_pointer(key)
            current_etag = current[1] if current else None
            if current_etag != expected_etag:
                raise PointerConflict(f"{key}: expected {expected_etag}, found {current_etag}")
            self.put(key, data)
