"""The user store: each user's records per source, as an append log of Parquet segments.

Layout (embedded default, under ``$LORA_ASSETS_HOME/users``)::

    <user>/<source>/snapshot-<seq>.parquet   compacted state up to and including <seq>
    <user>/<source>/log-<seq>.parquet        one segment per write: rows + _op (upsert|delete)

A write never rewrites existing objects: it adds one segment (an atomic object write) so a
crash leaves either the old state or the new one. ``compact`` folds segments into a snapshot;
after a delete the change's dataset run does so (``compact_deleted``), so a deleted record's text
stays in the store only until then. The log's sequence numbers also let a dataset ask "what
changed since seq N" and reduce over just that (see ``changes_since``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lora_assets.data.schemas import SOURCES, InvalidRecord, schema_for
from lora_assets.storage import LocalObjectStore, ObjectStore, PreconditionFailed

_USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
_SEG_RE = re.compile(r"^(log|snapshot)-(\d{12})\.parquet$")
OP_UPSERT, OP_DELETE = "upsert", "delete"


class InvalidUserId(ValueError):
    """A user id that could escape its directory or break partition keys."""


def validate_user_id(user: str) -> str:
    """Accept ``[A-Za-z0-9][A-Za-z0-9._@-]*`` without ``..``: no path traversal, no ``,`` ``|`` ``/``.

    ``,`` and ``|`` would break Dagster multi-partition keys; ``/`` and ``..`` would escape the
    user's folder. Checked before anything touches the disk.
    """
    if not isinstance(user, str) or not _USER_RE.match(user) or ".." in user:
        raise InvalidUserId(
            f"invalid user id {user!r}: use letters, digits, '.', '_', '@' or '-' "
            "(no '/', ',', '|', '..'; at most 128 chars)"
        )
    return user


@dataclass(frozen=True)
class WriteResult:
    user: str
    source: str
    seq: int  # sequence number of the segment just written
    upserts: int
    deletes: int


class UserStore:
    """Per-user, per-source records with stable ids; upserts and deletes as an append log.

    Built on an ``ObjectStore``: a folder on the embedded default, an S3 prefix at scale. A
    segment is created with a conditional write (create-if-absent), so two writers can never
    both take the same sequence number.
    """

    def __init__(self, root: Path | ObjectStore) -> None:
        self.objects: ObjectStore = LocalObjectStore(root) if isinstance(root, (str, Path)) else root

    def _prefix(self, user: str, source: str) -> str:
        validate_user_id(user)
        schema_for(source)
        return f"{user}/{source}"

    def _segments(self, user: str, source: str) -> list[tuple[int, str, str]]:
        """(seq, kind, key) of every segment, in log order (snapshot before log at equal seq)."""
        prefix = self._prefix(user, source)
        segs = []
        for key in self.objects.list(prefix):
            m = _SEG_RE.match(key[len(prefix) + 1 :])
            if m:
                segs.append((int(m.group(2)), m.group(1), key))
        return sorted(segs, key=lambda s: (s[0], s[1] == "log"))

    def _read(self, key: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.objects.get(key)))

    def head(self, user: str, source: str) -> int:
        """Sequence number of the latest write (0 when there is none)."""
        segs = self._segments(user, source)
        return segs[-1][0] if segs else 0

    def write(
        self,
        user: str,
        source: str,
        upserts: pa.Table | None = None,
        deletes: Iterable[str] = (),
    ) -> WriteResult:
        """Append one segment holding these upserts and deletes (deletes apply after upserts)."""
        schema = schema_for(source)
        prefix = self._prefix(user, source)
        upserts = upserts if upserts is not None else schema.empty_table()
        if upserts.schema != schema:
            try:
                upserts = upserts.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                raise InvalidRecord(f"user {user!r}: {source} batch does not match schema: {exc}") from None
        delete_ids = list(deletes)
        for rid in delete_ids:
            if not isinstance(rid, str) or not rid:
                raise InvalidRecord(f"user {user!r}: {source} delete with invalid id {rid!r}")
        if not upserts.num_rows and not delete_ids:
            return WriteResult(user, source, self.head(user, source), 0, 0)
        deleted = pa.Table.from_pydict(
            {n: pa.nulls(len(delete_ids), type=schema.field(n).type) for n in schema.names}
        ).set_column(0, "id", pa.array(delete_ids, pa.string()))
        segment = pa.concat_tables([upserts, deleted]).append_column(
            "_op", pa.array([OP_UPSERT] * upserts.num_rows + [OP_DELETE] * len(delete_ids))
        )
        sink = pa.BufferOutputStream()
        pq.write_table(segment, sink)
        data = sink.getvalue().to_pybytes()
        seq = self.head(user, source) + 1
        while True:
            try:
                self.objects.put_if(f"{prefix}/log-{seq:012d}.parquet", data, expected_etag=None)
                break
            except PreconditionFailed:
                seq += 1  # a concurrent writer took this sequence number
        return WriteResult(user, source, seq, upserts.num_rows, len(delete_ids))

    def check_segment(self, user: str, source: str, seq: int) -> None:
        """Raise if segment ``seq`` is neither readable nor folded into a snapshot."""
        segs = self._segments(user, source)
        if any(kind == "snapshot" and n >= seq for n, kind, _ in segs):
            return
        match = [key for n, kind, key in segs if kind == "log" and n == seq]
        if not match:
            raise FileNotFoundError(f"user {user!r}: {source} segment {seq} does not exist")
        try:
            pq.read_metadata(pa.BufferReader(self.objects.get(match[0])))
        except Exception as exc:  # pyarrow raises several types for a corrupt footer
            raise OSError(f"user {user!r}: {source} segment {match[0]} is unreadable: {exc}") from None

    def changes_since(self, user: str, source: str, seq: int) -> tuple[pa.Table, int]:
        """Log rows written after ``seq`` (with ``_op``), last write per id wins, and the new head.

        Raises ``LookupError`` when ``seq`` is older than the latest snapshot (compacted away):
        the caller then rebuilds from ``read``.
        """
        segs = self._segments(user, source)
        snaps = [s for s in segs if s[1] == "snapshot"]
        if snaps and snaps[-1][0] > seq:
            raise LookupError(f"changes before seq {snaps[-1][0]} were compacted")
        logs = [key for n, kind, key in segs if kind == "log" and n > seq]
        head = segs[-1][0] if segs else seq
        if not logs:
            return _with_op(schema_for(source)).empty_table(), head
        return _last_per_id(pa.concat_tables([self._read(k) for k in logs])), head

    def read(self, user: str, source: str) -> pa.Table:
        """Current records (upserts applied, deletes removed), sorted by id."""
        return self.read_at_head(user, source)[0]

    def read_at_head(self, user: str, source: str) -> tuple[pa.Table, int]:
        """Current records and the sequence number they reflect, from one listing of the log."""
        schema = schema_for(source)
        segs = self._segments(user, source)
        head = segs[-1][0] if segs else 0
        start = 0
        for i, (_, kind, _) in enumerate(segs):
            if kind == "snapshot":
                start = i
        parts = [self._read(key) for _, _, key in segs[start:]]
        parts = [
            t if "_op" in t.column_names else t.append_column("_op", pa.array([OP_UPSERT] * t.num_rows, pa.string()))
            for t in parts
        ]
        if not parts:
            return schema.empty_table(), head
        current = _last_per_id(pa.concat_tables(parts))
        current = current.filter(pc.equal(current["_op"], OP_UPSERT)).drop_columns(["_op"])
        return current.cast(schema).sort_by("id"), head

    def compact(self, user: str, source: str) -> None:
        """Fold the log into one snapshot; the segments it covers are removed after it is written."""
        segs = self._segments(user, source)
        if len(segs) <= 1 and (not segs or segs[0][1] == "snapshot"):
            return
        head = segs[-1][0]
        sink = pa.BufferOutputStream()
        pq.write_table(self.read(user, source), sink)
        self.objects.put(f"{self._prefix(user, source)}/snapshot-{head:012d}.parquet", sink.getvalue().to_pybytes())
        for n, kind, key in segs:
            # Only what the snapshot covers; a segment a concurrent writer added stays.
            if n < head or (n == head and kind == "log"):
                self.objects.delete(key)

    def compact_deleted(self, user: str, source: str) -> bool:
        """Compact when a segment since the last snapshot holds a delete, so a deleted record's
        text leaves the store (every older segment that held it is removed). The dataset run of
        the change calls it (``pipeline.source_state``); returns whether it compacted."""
        segs = self._segments(user, source)
        start = max((i for i, (_, kind, _) in enumerate(segs) if kind == "snapshot"), default=0)
        for _, kind, key in segs[start:]:
            if kind == "log":
                ops = pq.read_table(pa.BufferReader(self.objects.get(key)), columns=["_op"])["_op"]
                if pc.any(pc.equal(ops, OP_DELETE)).as_py():
                    self.compact(user, source)
                    return True
        return False

    def fingerprint(self, user: str, source: str) -> str:
        """Content hash of the current records: the data version of this user's source."""
        return table_fingerprint(self.read(user, source))


def _with_op(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("_op", pa.string()))


def _last_per_id(log: pa.Table) -> pa.Table:
    """Keep the last row of each id (log order = write order)."""
    idx = pa.array(range(log.num_rows), pa.int64())
    last = (
        pa.table({"id": log["id"], "i": idx}).group_by("id", use_threads=False).aggregate([("i", "max")])
    )
    rows = last["i_max"]
    return log.take(pc.take(rows, pc.sort_indices(rows)))  # surviving rows, in log order


def table_fingerprint(table: pa.Table) -> str:
    """sha256 of a table's content in a canonical form (sorted by id, one chunk, IPC bytes)."""
    if "id" in table.column_names:
        table = table.sort_by("id")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()[:32]


def write_user(store: UserStore, user: str, tables: dict[str, pa.Table]) -> list[WriteResult]:
    """Upsert every given source of one user (used by the synthetic seeder)."""
    return [store.write(user, s, t) for s, t in tables.items() if s in SOURCES]
