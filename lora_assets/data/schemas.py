"""Record schemas of every user data source, in one place.

Every record has a stable ``id`` (unique within its user and source) so that an update replaces
the record and a delete removes it, and so that datasets and errors can point back at it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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


class InvalidRecord(ValueError):
    """A record that does not fit its source's schema; the message names it."""


def schema_for(source: str) -> pa.Schema:
    try:
        return SOURCE_SCHEMAS[source]
    except KeyError:
        raise InvalidRecord(f"unknown source {source!r}; sources are {', '.join(SOURCES)}") from None


def records_to_table(source: str, records: Iterable[Mapping[str, Any]], where: str = "") -> pa.Table:
    """Validate plain dict records against the source schema and build a table.

    Fails on the first bad record with its id (or position) so the caller can report exactly
    which record of which file or user is wrong.
    """
    schema = schema_for(source)
    rows = list(records)
    seen: set[str] = set()
    for i, rec in enumerate(rows):
        rid = rec.get("id") if isinstance(rec, Mapping) else None
        label = f"{where}{source} record {rid!r}" if rid else f"{where}{source} record #{i}"
        if not isinstance(rec, Mapping):
            raise InvalidRecord(f"{label}: expected an object, got {type(rec).__name__}")
        if not isinstance(rid, str) or not rid:
            raise InvalidRecord(f"{label}: missing string 'id'")
        if rid in seen:
            raise InvalidRecord(f"{label}: duplicate id in one batch")
        seen.add(rid)
        unknown = set(rec) - set(schema.names)
        if unknown:
            raise InvalidRecord(f"{label}: unknown fields {sorted(unknown)}")
    try:
        return pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
    except _ARROW_ERRORS:
        pass
    # The batch does not convert: find the first record that does not, to name it.
    for i, rec in enumerate(rows):
        try:
            pa.Table.from_pylist([dict(rec)], schema=schema)
        except _ARROW_ERRORS as exc:
            raise InvalidRecord(f"{where}{source} record {rec['id']!r}: {exc}") from None
    raise InvalidRecord(f"{where}{source}: records do not fit the schema")  # pragma: no cover


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError)
