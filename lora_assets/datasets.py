"""Per-mode datasets, built incrementally from the user store's change log. No dagster, no torch.

A dataset remembers (in its Parquet file's metadata) which log position of its primary source it
reflects and the fingerprints of its context sources. The next build reduces over only the
primary records written since: upserts add or replace their example, deletes remove it. When a
context source changed (a renamed contact can change every prompt) or the log was compacted past
that position, it rebuilds in full. Both paths give the identical table; a test holds them to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lora_assets.data.user_store import OP_DELETE, UserStore, validate_user_id
from lora_assets.modes import (
    DATASET_COLUMNS,
    Mode,
    context_for,
    examples_for_records,
    examples_from_tables,
)
from lora_assets.storage import ObjectStore, PreconditionFailed

_STATE_KEY = b"lora_assets.dataset_state"
DATASET_SCHEMA = pa.schema([(c, pa.string()) for c in DATASET_COLUMNS])


@dataclass(frozen=True)
class DatasetState:
    """Which inputs a dataset reflects (primary log position, context fingerprints), and which
    stored records of the primary source it could not use (id -> why), kept across builds."""

    primary_seq: int
    context_fingerprints: dict[str, str]
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildReport:
    how: str  # "full" or "incremental"
    changed_records: int  # primary records reduced over (all of them on a full build)
    rows: int
    skipped: dict[str, str] = field(default_factory=dict)  # unusable records in the dataset's source


def dataset_object_key(user: str, mode: str) -> str:
    """Where a user's dataset of a mode lives in the datasets object store."""
    return f"{validate_user_id(user)}/{mode}.parquet"


def content_hash(df: pd.DataFrame) -> str:
    """The dataset's data version: a hash of its rows in id order."""
    h = hashlib.sha256()
    for row in df.sort_values("example_id").itertuples(index=False):
        h.update(json.dumps(list(row), ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:32]


def full_build(store: UserStore, mode: Mode, user: str) -> tuple[pd.DataFrame, DatasetState]:
    """The dataset from the current state of every source the mode reads."""
    primary, seq = store.read_at_head(user, mode.primary)
    tables = {mode.primary: primary, **{s: store.read(user, s) for s in mode.context}}
    built = examples_from_tables(mode, tables)
    return built.df, DatasetState(seq, _context_fingerprints(store, mode, user), built.skipped)


def build_dataset(
    store: UserStore, mode: Mode, user: str, previous: tuple[pd.DataFrame, DatasetState] | None
) -> tuple[pd.DataFrame, DatasetState, BuildReport]:
    """Bring ``previous`` up to date by reducing over the changes since it, or rebuild."""
    # Pairs span records (an accepted and a rejected suggestion), so DPO datasets rebuild in full.
    if previous is not None and not mode.objective.pairwise and list(previous[0].columns) == list(DATASET_COLUMNS):
        old_df, old_state = previous
        ctx_fps = _context_fingerprints(store, mode, user)
        if ctx_fps == old_state.context_fingerprints:
            try:
                changes, head = store.changes_since(user, mode.primary, old_state.primary_seq)
            except LookupError:
                pass  # compacted past our position: fall through to a full build
            else:
                df, skipped = _apply_changes(mode, user, old_df, old_state.skipped, changes, store)
                report = BuildReport("incremental", changes.num_rows, len(df), skipped)
                return df, DatasetState(head, ctx_fps, skipped), report
    df, state = full_build(store, mode, user)
    return df, state, BuildReport("full", len(df), len(df), state.skipped)


def _apply_changes(
    mode: Mode, user: str, old: pd.DataFrame, old_skipped: dict[str, str], changes: pa.Table, store: UserStore
) -> tuple[pd.DataFrame, dict[str, str]]:
    if not changes.num_rows:
        return old, old_skipped
    touched = set(changes["id"].to_pylist())
    upserts = changes.filter(pc.not_equal(changes["_op"], OP_DELETE)).drop_columns(["_op"])
    ctx = context_for(mode, {s: store.read(user, s) for s in mode.context})
    fresh = examples_for_records(mode, ctx, upserts.to_pylist())
    kept = old[~old["example_id"].isin(touched)]
    df = pd.concat([kept, fresh.df], ignore_index=True) if len(fresh.df) else kept
    skipped = {**{i: why for i, why in old_skipped.items() if i not in touched}, **fresh.skipped}
    return df.sort_values("example_id", kind="stable").reset_index(drop=True)[list(DATASET_COLUMNS)], skipped


def _context_fingerprints(store: UserStore, mode: Mode, user: str) -> dict[str, str]:
    return {s: store.fingerprint(user, s) for s in mode.context}


def _encode(df: pd.DataFrame, state: DatasetState) -> bytes:
    table = pa.Table.from_pandas(df[list(DATASET_COLUMNS)], schema=DATASET_SCHEMA, preserve_index=False)
    meta = {_STATE_KEY: json.dumps({"primary_seq": state.primary_seq, "context": state.context_fingerprints,
                                    "skipped": state.skipped}).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink)
    return sink.getvalue().to_pybytes()


def decode_dataset(data: bytes) -> tuple[pd.DataFrame, DatasetState]:
    table = pq.read_table(pa.BufferReader(data))
    raw = json.loads((table.schema.metadata or {})[_STATE_KEY])
    df = table.replace_schema_metadata(None).to_pandas()
    return df, DatasetState(raw["primary_seq"], raw["context"], raw.get("skipped", {}))


def write_dataset(objects: ObjectStore, user: str, mode: str, df: pd.DataFrame, state: DatasetState) -> str:
    """Write atomically (one object), with the build state in the Parquet schema metadata."""
    key = dataset_object_key(user, mode)
    objects.put(key, _encode(df, state))
    return key


def read_dataset(objects: ObjectStore, user: str, mode: str) -> tuple[pd.DataFrame, DatasetState] | None:
    """A written dataset and its build state, or None when there is none yet."""
    found = objects.get_with_etag(dataset_object_key(user, mode))
    return decode_dataset(found[0]) if found else None


@dataclass(frozen=True)
class RefreshedDataset:
    df: pd.DataFrame
    report: BuildReport
    version: str  # content hash: the dataset's data version
    location: str  # where it was written (a path or an s3:// URI)


def refresh_dataset(store: UserStore, objects: ObjectStore, mode: Mode, user: str) -> RefreshedDataset:
    """Bring a user's dataset of ``mode`` up to date with the store and write it.

    The write is a compare-and-swap on the object read: two builds of the same dataset running
    at once (a retried run overlapping a new one) cannot put an older state over a newer one;
    the loser starts again from the winner's result.
    """
    key = dataset_object_key(user, mode.name)
    for _attempt in range(10):
        found = objects.get_with_etag(key)
        previous = decode_dataset(found[0]) if found else None
        df, state, report = build_dataset(store, mode, user, previous)
        try:
            objects.put_if(key, _encode(df, state), expected_etag=found[1] if found else None)
        except PreconditionFailed:
            continue
        return RefreshedDataset(df, report, content_hash(df), objects.uri(key))
    raise PreconditionFailed(f"{objects.uri(key)}: gave up after 10 concurrent rebuilds")
