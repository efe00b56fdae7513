"""Record schemas of every user data source, in one place.

Every record has a stable ``id`` (unique within its user and source) so that an update replaces
the record and a delete removes it, and so that datasets and errors can point back at it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

_TS = pa.timestamp("s", tz="UTC")

SOURCE_SCHEMAS: dict[str, pa.Schema] = {
    # Incoming mail and, when the user answered it, the user's reply.
    "mail": pa.schema(
        [
            ("id", pa.string()),
            ("sender", pa.string()),
            ("sender_email", pa.string()),
            ("subject", pa.string()),
            ("body", pa.string()),
            ("reply", pa.string()),  # null when the user did not answer
            ("received_at", _TS),
        ]
    ),
    # Chat messages received and the user's reply.
    "messages": pa.schema(
        [
            ("id", pa.string()),
            ("contact", pa.string()),
            ("text", pa.string()),
            ("reply", pa.string()),
            ("sent_at", _TS),
        ]
    ),
    "contacts": pa.schema(
        [
            ("id", pa.string()),
            ("name", pa.string()),
            ("email", pa.string()),
            ("relation", pa.string()),  # friend, colleague, family, ...
            ("nickname", pa.string()),  # what the user calls them
        ]
    ),
    "calendar": pa.schema(
        [
            ("id", pa.string()),
            ("title", pa.string()),
            ("start", _TS),
            ("location", pa.string()),
            ("attendees", pa.list_(pa.string())),
        ]
    ),
    # A search query and the page the user opened from it.
    "browsing": pa.schema(
        [
            ("id", pa.string()),
            ("query", pa.string()),
            ("page_title", pa.string()),
            ("page_url", pa.string()),
            ("visited_at", _TS),
        ]
    ),
    # Photo metadata and the user's own caption.
    "photos": pa.schema(
        [
            ("id", pa.string()),
            ("taken_at", _TS),
            ("location", pa.string()),
            ("people", pa.list_(pa.string())),
            ("tags", pa.list_(pa.string())),
            ("caption", pa.string()),
        ]
    ),
    # What a mode suggested and what the user did with it.
    "feedback": pa.schema(
        [
            ("id", pa.string()),
            ("mode", pa.string()),
            ("prompt", pa.string()),
            ("suggestion", pa.string()),
            ("outcome", pa.string()),  # accepted | rejected | edited
            ("edit", pa.string()),  # the user's version when outcome == edited
            ("at", _TS),
        ]
    ),
}

SOURCES: tuple[str, ...] = tuple(SOURCE_SCHEMAS)
FEEDBACK_OUTCOMES = ("accepted", "rejected", "edited")

# Fields a record must carry to be usable by the modes that read its source (besides ``id``).
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "mail": ("sender", "subject", "body"),  # ``reply`` may be missing: mail the user did not answer
    "messages": ("contact", "text"),
    "contacts": ("name",),
    "calendar": ("title", "start"),
    "browsing": ("query",),
    "photos": ("location", "caption"),
    "feedback": ("prompt", "suggestion", "outcome"),  # and ``edit`` when the outcome is "edited"
}


class InvalidRecord(ValueError):
    """A record that does not fit its source's schema; the message names it."""


@dataclass(frozen=True)
class Limits:
    """What ingest accepts, so one record can never block a user or blow up a training run."""

    max_record_bytes: int = 64 * 1024  # one JSONL line; a long mail is ~10 KB
    max_field_chars: int = 16 * 1024  # one text field
    max_list_items: int = 64  # people on a photo, attendees of an event
    max_depth: int = 3  # JSON nesting: the record object, a list, its strings


DEFAULT_LIMITS = Limits()


def schema_for(source: str) -> pa.Schema:
    try:
        return SOURCE_SCHEMAS[source]
    except KeyError:
        raise InvalidRecord(f"unknown source {source!r}; sources are {', '.join(SOURCES)}") from None


def parse_timestamp(value: Any) -> datetime:
    """Epoch seconds (int or float) or an ISO-8601 string; a string without an offset is UTC."""
    if isinstance(value, bool):
        raise ValueError(f"expected epoch seconds or an ISO-8601 string, got {value!r}")
    if isinstance(value, (int, float)):
        if not -1e11 < value < 1e11:  # years 1..5138: anything else is milliseconds or garbage
            raise ValueError(f"{value!r} is not epoch seconds (milliseconds? divide by 1000)")
        return datetime.fromtimestamp(value, tz=timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO-8601 timestamp (e.g. 2026-03-15T18:58:00+00:00)") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    raise ValueError(f"expected epoch seconds or an ISO-8601 string, got {type(value).__name__} {value!r}")


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def validate_record(source: str, rec: Any, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Check one record against its source's schema, required fields and limits; return it with
    timestamps parsed. Raises InvalidRecord naming the record id and the field."""
    schema = schema_for(source)
    if not isinstance(rec, Mapping):
        raise InvalidRecord(f"expected a JSON object, got {_describe(rec)}")
    rid = rec.get("id")
    label = f"{source} record {rid!r}" if isinstance(rid, str) and rid else f"{source} record"
    if not isinstance(rid, str) or not rid.strip():
        raise InvalidRecord(f"{label}: missing string 'id'")
    if len(rid) > 256:
        raise InvalidRecord(f"{label[:60]}...: 'id' is {len(rid)} characters, more than 256")
    unknown = sorted(set(rec) - set(schema.names))
    if unknown:
        raise InvalidRecord(f"{label}: unknown fields {unknown}; {source} has {', '.join(schema.names)}")
    out: dict[str, Any] = {}
    for field in schema:
        value = rec.get(field.name)
        try:
            out[field.name] = None if value is None else _check_value(field.type, value, limits)
        except ValueError as exc:
            raise InvalidRecord(f"{label}: field {field.name!r}: {exc}") from None
    missing = [f for f in REQUIRED_FIELDS[source] if out.get(f) is None or (isinstance(out[f], str) and not out[f].strip())]
    if source == "feedback" and out.get("outcome") == "edited" and not (out.get("edit") or "").strip():
        missing.append("edit")
    if missing:
        raise InvalidRecord(f"{label}: missing {', '.join(repr(m) for m in missing)} (required for {source})")
    if source == "feedback" and out["outcome"] not in FEEDBACK_OUTCOMES:
        raise InvalidRecord(f"{label}: field 'outcome': {out['outcome']!r} is not one of {', '.join(FEEDBACK_OUTCOMES)}")
    return out


def _check_value(kind: pa.DataType, value: Any, limits: Limits) -> Any:
    if pa.types.is_string(kind):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        if len(value) > limits.max_field_chars:
            raise ValueError(f"is {len(value)} characters, more than the limit of {limits.max_field_chars}")
        return value
    if pa.types.is_timestamp(kind):
        return parse_timestamp(value)
    if pa.types.is_list(kind):
        if not isinstance(value, list):
            raise ValueError(f"must be a list of strings, got {_describe(value)}")
        if len(value) > limits.max_list_items:
            raise ValueError(f"has {len(value)} items, more than the limit of {limits.max_list_items}")
        return [_check_value(kind.value_type, v, limits) for v in value]
    raise ValueError(f"unsupported type {kind}")  # pragma: no cover - every schema type is handled


def records_to_table(
    source: str, records: Iterable[Mapping[str, Any]], where: str = "", labels: Sequence[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> pa.Table:
    """Validate plain dict records against the source schema and build a table.

    Fails on the first bad record, naming it (``labels[i]``, e.g. ``file:line: ``, or its
    position) and the field, so the caller can report exactly what to fix; nothing is written.
    """
    schema = schema_for(source)
    rows, seen = [], set()
    for i, rec in enumerate(records):
        where_i = f"{where}{labels[i] if labels else ''}"
        try:
            row = validate_record(source, rec, limits)
        except InvalidRecord as exc:
            position = "" if labels else f"#{i}: "
            raise InvalidRecord(f"{where_i}{position}{exc}") from None
        if row["id"] in seen:
            raise InvalidRecord(f"{where_i}{source} record {row['id']!r}: duplicate id in one batch")
        seen.add(row["id"])
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)
