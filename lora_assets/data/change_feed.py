"""The change feed: a durable queue of "user U's source S changed" events.

Embedded default: SQLite in the data dir (WAL, one row per event). Delivery is at-least-once:
a consumer reads events after its cursor and acknowledges them only once the runs they caused
are recorded (for the Dagster sensor: once a tick with a later cursor has been committed). An
event that cannot be processed (a poison event) is moved to the dead-letter state with its
error, so it is reported and never blocks the events behind it.

An event names the user store segment it announces (``user``, ``source``, ``seq``) so a consumer
can check that the data is really there and readable before acting on it.

No lost writes: ``ingest`` *stages* an event (user and source) before it writes the segment and
*confirms* it after. A staged event whose writer died (killed between the two) is announced by
the feed itself once it is ``staged_grace_s`` old, with seq 0 ("look again": the dataset is
rebuilt from the store's current state, harmless if the segment never got written). Confirmed
and recovered events get a fresh id, so a consumer whose cursor has moved on still sees them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',   -- staged | pending | dead
    error TEXT,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_status_id ON events(status, id);
"""


@dataclass(frozen=True)
class ChangeEvent:
    """One batch written to the user store."""

    user: str
    source: str
    seq: int  # the user store log segment this batch became
    upserts: int = 0
    deletes: int = 0
    sequencer: str = ""  # S3's per-key ordering token, when the event came from S3

    def to_json(self) -> str:
        return json.dumps(
            {"user": self.user, "source": self.source, "seq": self.seq,
             "upserts": self.upserts, "deletes": self.deletes},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, payload: str) -> ChangeEvent:
        """Decode a payload; raises ValueError (with the reason) on anything malformed."""
        try:
            raw = json.loads(payload)
            event = cls(
                user=raw["user"], source=raw["source"], seq=int(raw["seq"]),
                upserts=int(raw.get("upserts", 0)), deletes=int(raw.get("deletes", 0)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"undecodable change event {payload[:200]!r}: {exc}") from None
        if not isinstance(event.user, str) or not isinstance(event.source, str):
            raise ValueError(f"undecodable change event {payload[:200]!r}: user/source must be strings")
        return event


def _names_user(payload: str, user: str) -> bool:
    try:
        raw = json.loads(payload)
        return isinstance(raw, dict) and raw.get("user") == user
    except ValueError:
        return json.dumps(user) in payload or f"/{user}/" in payload


@dataclass(frozen=True)
class Delivery:
    """One unit a feed hands to the sensor: the events it carries, or why it could not be read."""

    ref: str  # feed-specific handle (SQLite event id, SQS receipt handle)
    payload: str
    events: list[ChangeEvent]
    error: str | None = None


@dataclass(frozen=True)
class FeedItem:
    """An event as stored: its feed id and raw payload (decoded by the consumer)."""

    id: int
    payload: str


class ChangeFeed:
    """Durable SQLite queue; safe for several processes (writers serialize on SQLite's lock)."""

    def __init__(self, path: Path, staged_grace_s: float = 60.0) -> None:
        self.path = Path(path)
        self.staged_grace_s = staged_grace_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as conn:
            conn.executescript(_SCHEMA)

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an appended event survives a power cut
            yield conn
        finally:
            conn.close()

    def announce(self, event: ChangeEvent) -> int:
        """Tell consumers about a batch the user store took (the SQLite feed stores an event)."""
        return self.append(event)

    def stage(self, user: str, source: str) -> int:
        """Before a segment is written: a staged event the feed announces if the writer dies."""
        payload = json.dumps({"user": user, "source": source, "seq": 0}, sort_keys=True)
        with self._conn() as conn:
            cur = conn.execute(
                "INSERT INTO events(payload, status, created_at) VALUES (?, 'staged', ?)", (payload, time.time())
            )
            return int(cur.lastrowid)

    def confirm(self, staged: int, event: ChangeEvent) -> int:
        """After the segment is written: the staged event becomes a pending one (a fresh id)."""
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM events WHERE id = ? AND status = 'staged'", (staged,))
            cur = conn.execute("INSERT INTO events(payload, created_at) VALUES (?, ?)", (event.to_json(), time.time()))
            conn.execute("COMMIT")
            return int(cur.lastrowid)

    def recover_staged(self) -> int:
        """Announce the staged events whose writer died; returns how many."""
        cutoff = time.time() - self.staged_grace_s
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT id, payload FROM events WHERE status = 'staged' AND created_at < ? ORDER BY id", (cutoff,)
            ).fetchall()
            for event_id, payload in rows:
                conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
                conn.execute("INSERT INTO events(payload, created_at) VALUES (?, ?)", (payload, time.time()))
            conn.execute("COMMIT")
        return len(rows)

    def consume(self, cursor: str | None, limit: int) -> tuple[list[Delivery], str]:
        """Acknowledge up to the committed cursor, then read the next ``limit`` events.

        The returned cursor is what the caller commits together with the runs it launches.
        """
        after = int(cursor or 0)
        self.ack_through(after)
        self.recover_staged()
        deliveries = []
        for item in self.read_after(after, limit):
            try:
                deliveries.append(Delivery(str(item.id), item.payload, [ChangeEvent.from_json(item.payload)]))
            except ValueError as exc:
                deliveries.append(Delivery(str(item.id), item.payload, [], str(exc)))
        return deliveries, deliveries[-1].ref if deliveries else str(after)

    def set_aside(self, delivery: Delivery, error: str) -> None:
        self.dead_letter(int(delivery.ref), error)

    def append(self, event: ChangeEvent | str) -> int:
        """Add an event (or a raw payload, as a foreign producer might send); returns its id."""
        payload = event.to_json() if isinstance(event, ChangeEvent) else event
        with self._conn() as conn:
            cur = conn.execute(
                "INSERT INTO events(payload, created_at) VALUES (?, ?)", (payload, time.time())
            )
            return int(cur.lastrowid)

    def read_after(self, after_id: int, limit: int = 1000) -> list[FeedItem]:
        """Pending events with id > ``after_id``, oldest first (an index range scan)."""
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT id, payload FROM events WHERE status = 'pending' AND id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [FeedItem(int(i), p) for i, p in rows]

    def ack_through(self, event_id: int) -> int:
        """Forget pending events up to ``event_id`` (their runs are recorded); returns how many."""
        with self._conn() as conn:
            return conn.execute(
                "DELETE FROM events WHERE status = 'pending' AND id <= ?", (event_id,)
            ).rowcount

    def dead_letter(self, event_id: int, error: str) -> None:
        """Set a poison event aside with its error; it is never delivered again."""
        with self._conn() as conn:
            conn.execute("UPDATE events SET status = 'dead', error = ? WHERE id = ?", (error, event_id))

    def dead_letters(self) -> list[tuple[int, str, str]]:
        with self._conn() as conn:
            rows = conn.execute("SELECT id, payload, error FROM events WHERE status = 'dead' ORDER BY id")
            return [(int(i), p, e) for i, p, e in rows.fetchall()]

    def forget(self, user: str) -> tuple[int, int]:
        """Delete the pending (or staged) events and the dead letters that name ``user``.

        The table holds only what is not yet acknowledged plus the dead letters, so this scan is
        bounded by the backlog, not by the history. A payload too broken to decode is matched on
        the user id appearing in it.
        """
        with self._conn() as conn:
            rows = conn.execute("SELECT id, payload, status FROM events").fetchall()
            doomed = [(i, status) for i, payload, status in rows if _names_user(payload, user)]
            conn.executemany("DELETE FROM events WHERE id = ?", [(i,) for i, _ in doomed])
        dead = sum(status == "dead" for _, status in doomed)
        return len(doomed) - dead, dead

    def pending_count(self) -> int:
        """Events not yet acknowledged, staged ones (an ingest in progress or killed) included."""
        with self._conn() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM events WHERE status IN ('pending', 'staged')").fetchone()[0])
