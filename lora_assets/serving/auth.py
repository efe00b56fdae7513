"""Bearer tokens for the serving API: one user's each (or an admin's), stored hashed.

The token file (``Settings.serve_tokens_file``, default ``<data dir>/serve_tokens.json``) holds
``{"tokens": [{"sha256": ..., "user": "u1"}, {"sha256": ..., "admin": true}]}`` and never a token
itself: ``lora-assets serve-token`` prints a new token once and stores its SHA-256. A token is 32
random bytes, so a fast hash is enough (nothing to brute-force), and a lookup by digest leaks
nothing through its timing (a client cannot choose the digest it probes). The server re-reads the file when it changes, so issuing or revoking a token
needs no restart (on Kubernetes the file is a mounted Secret).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lora_assets.data.user_store import validate_user_id

TOKEN_PREFIX = "la-"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: one user, or an admin (``user`` None) who may use any adapter."""

    user: str | None

    def may_use(self, user: str) -> bool:
        return self.user is None or self.user == user


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _read(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a token file ({exc})") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
        raise ValueError(f"{path}: expected {{\"tokens\": [{{\"sha256\": ..., \"user\": ...}}]}}")
    return entries


def issue_token(path: Path, user: str | None) -> str:
    """A new token for ``user`` (None: an admin token); only its hash is written."""
    if user is not None:
        validate_user_id(user)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry = {"sha256": _digest(token), **({"user": user} if user is not None else {"admin": True})}
    _write(path, _read(path) + [entry])
    return token


def revoke_user(path: Path, user: str) -> int:
    """Remove every token of ``user``; returns how many there were."""
    entries = _read(path)
    kept = [e for e in entries if e.get("user") != user]
    _write(path, kept)
    return len(entries) - len(kept)


def _write(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tokens-")
    with os.fdopen(fd, "w") as f:
        json.dump({"tokens": entries}, f, indent=1)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


class TokenFile:
    """The token file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._principals: dict[str, Principal] = {}
        self._load()

    def _load(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._stamp is not None:
            return
        principals = {}
        for e in _read(self.path):
            principals[e["sha256"]] = Principal(None if e.get("admin") is True else str(e.get("user")))
        self._principals, self._stamp = principals, stamp

    def principal(self, authorization: str | None) -> Principal | None:
        """The owner of the request's ``Authorization: Bearer`` token; None when it is not valid."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        try:
            self._load()
        except ValueError:
            pass  # a half-edited file: keep the tokens read last time
        return self._principals.get(_digest(authorization[len("Bearer "):].strip()))
