"""Ingest: validate a batch, write it to the user store, announce it on the change feed.

The store write comes first and the event second: a crash between them leaves data without an
event (re-ingesting the file repairs it, idempotently), never an event without data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_assets.data.change_feed import ChangeEvent, ChangeFeed
from lora_assets.data.schemas import InvalidRecord, records_to_table, schema_for
from lora_assets.data.user_store import UserStore, WriteResult, validate_user_id

DELETE_FLAG = "_deleted"  # a JSONL line {"id": "...", "_deleted": true} deletes that record


@dataclass(frozen=True)
class IngestResult:
    write: WriteResult
    event_id: int | None  # None when the batch was empty, or the feed is S3's own notifications


def split_batch(
    records: Iterable[Mapping[str, Any]], where: str = ""
) -> tuple[list[dict[str, Any]], list[str]]:
    """Separate upserts from delete markers."""
    upserts, deletes = [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise InvalidRecord(f"{where}record #{i}: expected a JSON object")
        if rec.get(DELETE_FLAG):
            rid = rec.get("id")
            if not isinstance(rid, str) or not rid:
                raise InvalidRecord(f"{where}record #{i}: delete without a string 'id'")
            deletes.append(rid)
        else:
            upserts.append({k: v for k, v in rec.items() if k != DELETE_FLAG})
    return upserts, deletes


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; a bad line fails naming the file and line number."""
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidRecord(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return records


def ingest(
    store: UserStore,
    feed: ChangeFeed,
    user: str,
    source: str,
    records: Iterable[Mapping[str, Any]],
    where: str = "",
) -> IngestResult:
    """Validate every record first, then write one segment and append one change event."""
    validate_user_id(user)
    schema_for(source)
    label = f"{where}user {user!r}: "
    upserts, deletes = split_batch(records, label)
    table = records_to_table(source, upserts, where=label)
    write = store.write(user, source, table, deletes)
    if not write.upserts and not write.deletes:
        return IngestResult(write, None)
    event_id = feed.announce(ChangeEvent(user, source, write.seq, write.upserts, write.deletes))
    return IngestResult(write, event_id)


def ingest_file(store: UserStore, feed: ChangeFeed, user: str, source: str, path: Path) -> IngestResult:
    return ingest(store, feed, user, source, read_jsonl(path), where=f"{path}: ")
