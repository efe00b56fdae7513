"""Ingest: validate a batch, write it to the user store, announce it on the change feed.

Every record is checked (JSON, UTF-8, size, nesting, types, required fields) before anything is
written; a bad one fails the whole batch with its file, line, record id and field named.

No window where data is written but never announced: on the embedded default the change event
is *staged* in the feed before the segment is written and confirmed after, and the feed itself
announces a staged event whose ingest died (see ``ChangeFeed``). On S3 the bucket's own event
notification announces the segment the moment it exists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_assets.data.change_feed import ChangeEvent
from lora_assets.data.schemas import DEFAULT_LIMITS, InvalidRecord, Limits, records_to_table, schema_for
from lora_assets.data.user_store import UserStore, WriteResult, validate_user_id

DELETE_FLAG = "_deleted"  # a JSONL line {"id": "...", "_deleted": true} deletes that record


@dataclass(frozen=True)
class IngestResult:
    write: WriteResult
    announced: bool  # False only for an empty batch (nothing written)
    event_id: int | None  # the SQLite feed's event id; None on S3, where the bucket notification announces


def split_batch(
    records: Iterable[Any], where: str = "", labels: Sequence[str] | None = None
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Separate upserts from delete markers; also the labels of the upserts."""
    upserts, upsert_labels, deletes = [], [], []
    for i, rec in enumerate(records):
        label = f"{where}{labels[i]}" if labels else f"{where}record #{i}: "
        if not isinstance(rec, Mapping):
            raise InvalidRecord(f"{label}expected a JSON object, got {type(rec).__name__}")
        if rec.get(DELETE_FLAG):
            rid = rec.get("id")
            if not isinstance(rid, str) or not rid:
                raise InvalidRecord(f"{label}delete without a string 'id'")
            deletes.append(rid)
        else:
            upserts.append({k: v for k, v in rec.items() if k != DELETE_FLAG})
            upsert_labels.append(labels[i] if labels else f"record #{i}: ")
    return upserts, deletes, upsert_labels


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def read_jsonl(path: Path, limits: Limits = DEFAULT_LIMITS) -> tuple[list[Any], list[str]]:
    """Parse a JSONL file: the records and a ``file:line: `` label for each.

    A line that is not UTF-8, not JSON, too long or nested too deep fails naming the file and
    line, before anything else is read into memory.
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidRecord(f"{path}: is a directory, not a JSONL file")
    if not path.exists():
        raise InvalidRecord(f"{path}: no such file")
    records, labels = [], []
    with path.open("rb") as f:
        n = 0
        while True:
            raw = f.readline(limits.max_record_bytes + 1)
            if not raw:
                break
            n += 1
            if len(raw) > limits.max_record_bytes:
                raise InvalidRecord(
                    f"{path}:{n}: record longer than the limit of {limits.max_record_bytes} bytes "
                    "(LORA_ASSETS_MAX_RECORD_BYTES)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidRecord(
                    f"{path}:{n}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except RecursionError:
                raise InvalidRecord(f"{path}:{n}: nested deeper than {limits.max_depth} levels") from None
            except json.JSONDecodeError as exc:
                raise InvalidRecord(f"{path}:{n}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            if _depth(record) > limits.max_depth:
                raise InvalidRecord(f"{path}:{n}: nested deeper than {limits.max_depth} levels")
            records.append(record)
            labels.append(f"{path}:{n}: ")
    return records, labels


def ingest(
    store: UserStore,
    feed,
    user: str,
    source: str,
    records: Iterable[Any],
    where: str = "",
    labels: Sequence[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> IngestResult:
    """Validate every record first, then write one segment and announce it."""
    validate_user_id(user)
    schema_for(source)
    records = list(records)
    upserts, deletes, upsert_labels = split_batch(records, where, labels)
    table = records_to_table(source, upserts, where=f"{where}user {user!r}: " if not labels else where,
                             labels=upsert_labels, limits=limits)
    if not table.num_rows and not deletes:
        return IngestResult(WriteResult(user, source, store.head(user, source), 0, 0), False, None)
    staged = feed.stage(user, source)
    write = store.write(user, source, table, deletes)
    event_id = feed.confirm(staged, ChangeEvent(user, source, write.seq, write.upserts, write.deletes))
    return IngestResult(write, True, event_id)


def ingest_file(store: UserStore, feed, user: str, source: str, path: Path, limits: Limits = DEFAULT_LIMITS) -> IngestResult:
    records, labels = read_jsonl(path, limits)
    return ingest(store, feed, user, source, records, labels=labels, limits=limits)
