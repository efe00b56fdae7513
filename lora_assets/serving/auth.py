"""Bearer tokens for the serving API: one user's each (or an admin's), stored hashed.

The token file (``Settings.serve_tokens_file``: a path, or ``s3://bucket/key`` so that every
replica reads one file; default ``<data dir>/serve_tokens.json``) holds
``{"tokens": [{"sha256": ..., "user": "u1"}, {"sha256": ..., "admin": true}]}`` and never a token
itself: ``lora-assets serve-token`` prints a new token once and stores its SHA-256. A token is 32
random bytes, so a fast hash is enough (nothing to brute-force), and a lookup by digest leaks
nothing through its timing (a client cannot choose the digest it probes). The server re-reads the file when it changes (S3: checked at most every
``serve_refresh_s``), so issuing or revoking a token needs no restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_assets.data.user_store import validate_user_id
from lora_assets.storage import S3ObjectStore, storage_errors, validate_key

TOKEN_PREFIX = "la-"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: one user, or an admin (``user`` None) who may use any adapter."""

    user: str | None

    def may_use(self, user: str) -> bool:
        return self.user is None or self.user == user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class LocalTokens:
    """The token file on a local disk (a mounted Kubernetes Secret, or the data dir)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.name = str(self.path)

    def stamp(self) -> object:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def write(self, data: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tokens-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)


class S3Tokens:
    """The token file as an S3 object (``s3://bucket/key``): one place for every serving replica.
    Read and written through ``S3ObjectStore``, which knows what S3 answers for a missing object."""

    def __init__(self, client: Any, url: str) -> None:
        bucket, _, key = url.removeprefix("s3://").partition("/")
        bad = ValueError(f"LORA_ASSETS_SERVE_TOKENS_FILE={url!r}: expected s3://bucket/key")
        if not bucket:
            raise bad
        try:
            self.key = validate_key(key)  # refuses an empty or escaping key
        except ValueError:
            raise bad from None
        self.store, self.name = S3ObjectStore(client, bucket), url

    def stamp(self) -> object:
        return self.store.etag(self.key)

    def read(self) -> bytes | None:
        found = self.store.get_with_etag(self.key)
        return found[0] if found else None

    def write(self, data: bytes) -> None:
        self.store.put(self.key, data)


TokenSource = LocalTokens | S3Tokens


def _read(source: TokenSource) -> list[dict]:
    raw = source.read()
    if raw is None:
        return []
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{source.name}: not a token file ({exc})") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
        raise ValueError(f"{source.name}: expected {{\"tokens\": [{{\"sha256\": ..., \"user\": ...}}]}}")
    return entries


def issue_token(source: TokenSource, user: str | None) -> str:
    """A new token for ``user`` (None: an admin token); only its hash is written."""
    if user is not None:
        validate_user_id(user)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry = {"sha256": _digest(token), **({"user": user} if user is not None else {"admin": True})}
    _write(source, _read(source) + [entry])
    return token


def revoke_user(source: TokenSource, user: str) -> int:
    """Remove every token of ``user``; returns how many there were."""
    entries = _read(source)
    kept = [e for e in entries if e.get("user") != user]
    _write(source, kept)
    return len(entries) - len(kept)


def _write(source: TokenSource, entries: list[dict]) -> None:
    source.write(json.dumps({"tokens": entries}, indent=1).encode())


class TokenFile:
    """The tokens, re-read when the source changes (checked at most every ``recheck_s``)."""

    def __init__(self, source: TokenSource, recheck_s: float = 0.0) -> None:
        self.source = source
        self.recheck_s = recheck_s
        self._stamp: object = None
        self._checked = -1e18
        self._principals: dict[str, Principal] = {}
        self._load()

    def _load(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.recheck_s:
            return
        self._checked = now
        stamp = self.source.stamp()
        if stamp == self._stamp and stamp is not None:
            return
        principals = {}
        for e in _read(self.source):
            principals[e["sha256"]] = Principal(None if e.get("admin") is True else str(e.get("user")))
        self._principals, self._stamp = principals, stamp

    def principal(self, authorization: str | None) -> Principal | None:
        """The owner of the request's ``Authorization: Bearer`` token; None when it is not valid."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        try:
            self._load()
        except (ValueError, OSError, *storage_errors()):
            pass  # a half-edited or unreadable file: keep the tokens read last time
        return self._principals.get(_digest(authorization[len("Bearer "):].strip()))
