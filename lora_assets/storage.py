"""Object storage: the two primitives the user store and the drive are built on.

- ``put`` / ``get`` / ``list`` / ``delete`` of immutable objects, and
- ``put_if`` - a conditional write: create only if absent (``expected_etag=None``) or replace
  only if unchanged since read. On S3 that is ``If-None-Match: *`` / ``If-Match: <etag>``; on a
  local folder a per-key lock, a compare and ``os.replace``.

``LocalObjectStore`` is the embedded default; ``S3ObjectStore`` takes a boto3 client (from
dagster-aws's ``S3Resource``) and works against AWS S3 or any S3-compatible endpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

_KEY_RE = re.compile(r"^[A-Za-z0-9@._-]+(/[A-Za-z0-9@._-]+)*$")


def storage_errors() -> tuple[type[Exception], ...]:
    """What a store raises when it cannot be reached or read (no credentials, an unreachable
    endpoint, access denied), besides ``OSError``: botocore's errors, where boto3 is installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object exists, or changed since it was read."""


def validate_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def get_with_etag(self, key: str) -> tuple[bytes, str] | None: ...
    def etag(self, key: str) -> str | None: ...  # get_with_etag's etag without the body; None: no object
    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> None: ...
    def uri(self, key: str) -> str: ...


class LocalObjectStore:
    """Objects as files under a root folder.

    Writes go to a temp file under ``<root>/.tmp/`` first (same filesystem, so the rename into
    place is atomic); temp files left by a killed writer are swept once they are an hour old.
    Create-if-absent is a hard link (atomic, no lock file); replace-if-unchanged locks one lock
    file per key, kept under ``.tmp/locks/`` (one per pointer or dataset, not per segment).
    """

    STALE_TEMP_S = 3600

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / ".tmp"
        self._sweep()

    def _sweep(self) -> None:
        if not self._tmp.is_dir():
            return
        cutoff = time.time() - self.STALE_TEMP_S
        for entry in os.scandir(self._tmp):
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass  # another process swept it first

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    def _write_temp(self, data: bytes) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self._tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def put(self, key: str, data: bytes) -> None:
        """Write atomically (temp file, fsync, rename)."""
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_temp(data)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"object {key!r} not found") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        """Keys of every object under the folder ``prefix``, sorted."""
        base = self._path(prefix.rstrip("/"))
        if not base.is_dir():
            return []
        out = []
        for p in base.rglob("*"):
            rel = p.relative_to(self.root)
            if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                out.append(str(rel))
        return sorted(out)

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop folders the delete emptied, up to the root
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()

    def uri(self, key: str) -> str:
        return str(self._path(key))

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.md5(data).hexdigest()  # S3's ETag for a single-part upload

    def etag(self, key: str) -> str | None:
        found = self.get_with_etag(key)  # a local read costs what hashing it does
        return found[1] if found else None

    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if expected_etag is None:  # create if absent: a hard link fails if the name is taken
            tmp = self._write_temp(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                found = self.get_with_etag(key)
                raise PreconditionFailed(f"{key}: expected no object, found {found[1] if found else 'one'}") from None
            finally:
                tmp.unlink(missing_ok=True)
            return
        locks = self._tmp / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / hashlib.sha256(key.encode()).hexdigest()[:32], "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.get_with_etag(key)
            current_etag = current[1] if current else None
            if current_etag != expected_etag:
                raise PreconditionFailed(f"{key}: expected {expected_etag}, found {current_etag}")
            self.put(key, data)


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix/``, with S3 conditional writes for ``put_if``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.client, self.bucket, self.prefix = client, bucket, prefix.strip("/")

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _unkey(self, key: str) -> str:
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def get(self, key: str) -> bytes:
        found = self.get_with_etag(key)
        if found is None:
            raise FileNotFoundError(f"object s3://{self.bucket}/{self._key(key)} not found")
        return found[0]

    def exists(self, key: str) -> bool:
        return self.etag(key) is not None

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix.rstrip("/")) + "/"
        keys = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(self._unkey(o["Key"]) for o in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _request(self, call: str, key: str) -> dict | None:
        """``client.<call>`` on the key's object; None when there is no such object."""
        from botocore.exceptions import ClientError

        try:
            return getattr(self.client, call)(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        obj = self._request("get_object", key)
        return (obj["Body"].read(), obj["ETag"].strip('"')) if obj else None

    def etag(self, key: str) -> str | None:
        """A HEAD request: what a reader that caches the object checks before downloading it again."""
        head = self._request("head_object", key)
        return head["ETag"].strip('"') if head else None

    def put_if(self, key: str, data: bytes, expected_etag: str | None) -> None:
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if expected_etag is None else {"IfMatch": f'"{expected_etag}"'}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as exc:
            # 412: the condition failed; 409: a concurrent conditional write is in flight.
            if exc.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise PreconditionFailed(f"s3://{self.bucket}/{self._key(key)}: {exc}") from None
            raise
