"""Per-user state the project owns: one row per (user, mode) dataset and per (base model, user,
mode) adapter, plus a short history. No dagster here.

Why a table of our own: the Dagster event log answers "what is the latest materialization of
this partition" with indexed reads, but every question about a whole mode (how many adapters
are stale, which users failed) costs one query per user there (``status --mode`` was ~42 h at
1M users). Here the same question is one indexed SQL aggregate. The table is written in the same
step that records the Dagster events (``orchestration/recording.py``), read by ``status``, and
erased by ``forget``.

Storage: SQLite under the data dir on the embedded default (``<home>/state.sqlite``), the
deployment's Postgres at scale (``LORA_ASSETS_STATE_URL``, any SQLAlchemy URL).

A row's state is decided once, by ``REASON`` (a SQL ``CASE``), for one user and for a million
alike; ``REASONS`` maps each reason to the state ``status`` shows and its words.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as db

from lora_assets.state_schema import USER_TABLES, adapters, dataset_changes, datasets, history, metadata, users

SCAN_WORK_MEM = "256MB"  # per whole-mode query on Postgres (see StateStore._scanning)

d, a = datasets.alias("d"), adapters.alias("a")

# The one definition of a row's state (see REASONS), over datasets d LEFT JOIN adapters a.
REASON = db.case(
    (db.and_(a.c.withdrawn_at.is_not(None),
             db.or_(a.c.adapter_at.is_(None), a.c.withdrawn_at >= a.c.adapter_at)),
     db.case((db.and_(d.c.train_rows > 0, a.c.trained_on != d.c.version), "new_data_after_withdrawal"),
             else_="withdrawn")),
    (db.and_(d.c.train_rows == 0, a.c.user.is_(None)), "no_examples"),
    (db.and_(d.c.train_rows > 0, d.c.rows <= d.c.train_rows), "too_few_examples"),
    (db.or_(a.c.user.is_(None), a.c.adapter_version.is_(None)), "never_trained"),
    (a.c.trained_on != d.c.version, "dataset_changed"),
    (a.c.gate_passed.is_(False), "gate_failed"),
    (db.or_(a.c.published_at.is_(None), a.c.published_at < a.c.adapter_at), "not_published"),
    else_="fresh",
).label("reason")

# reason -> (state, why). States, best to worst: fresh, updating (a run is on it), stale, no_data, withdrawn.
REASONS: dict[str, tuple[str, str]] = {
    "fresh": ("fresh", "published adapter trained on the current dataset"),
    "not_published": ("stale", "trained and gated, not published yet"),
    "gate_failed": ("stale", "eval gate failed: {gate_reason}; devices keep {published_version}"),
    "dataset_changed": ("stale", "dataset changed since training (now {dataset_version}, trained on {trained_on})"),
    "never_trained": ("stale", "never trained"),
    "no_examples": ("no_data", "the dataset has no training example"),
    "too_few_examples": ("no_data", "{train_rows} training example(s) and none held out to gate an adapter on: "
                         "trained once the dataset holds one; devices keep {published_version}"),
    "no_dataset": ("no_data", "no dataset built yet"),
    "withdrawn": ("withdrawn", "its data was deleted; the adapter was removed from the drive"),
    "new_data_after_withdrawal": ("stale", "withdrawn earlier; new data since"),
}
STATES = ("fresh", "updating", "stale", "no_data", "withdrawn")

ROW_COLUMNS = [
    d.c.user, d.c.version.label("dataset_version"), d.c.train_rows, d.c.built_at,
    a.c.trained_on, a.c.adapter_version, a.c.adapter_at, a.c.steps, a.c.gate_passed, a.c.gate_reason,
    a.c.base_eval_loss, a.c.adapter_eval_loss, a.c.published_eval_loss, a.c.retrieval_eval_loss,
    a.c.adapter_retrieval_eval_loss, a.c.retrieval_helps, a.c.published_version,
    a.c.published_at, a.c.withdrawn_at, a.c.withdrawn_reason, a.c.run_id, a.c.error, a.c.error_at, REASON,
]


@dataclass(frozen=True)
class Page:
    rows: list[dict[str, Any]]
    next_after: str | None  # the user to continue after; None on the last page


def _cut(found: list[dict[str, Any]], limit: int) -> Page:
    """A page from up to ``limit + 1`` rows in user order: the extra one says there are more."""
    more = len(found) > limit
    return Page(found[:limit], found[limit - 1]["user"] if more else None)


def why(row: dict[str, Any]) -> tuple[str, str]:
    """(state, why in words) of a row read with ``ROW_COLUMNS``."""
    state, words = REASONS[row["reason"]]
    values = {**row, "published_version": row.get("published_version") or "nothing"}
    return state, words.format(**{k: ("" if v is None else v) for k, v in values.items()})


class StateStore:
    """The per-user state table on one SQLAlchemy engine (SQLite or Postgres)."""

    def __init__(self, url: str):
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine = db.create_engine(
            url, connect_args={"timeout": 60} if sqlite else {}, pool_pre_ping=not sqlite,
            poolclass=db.pool.NullPool if sqlite else None,
        )
        if sqlite:
            @db.event.listens_for(self.engine, "connect")
            def _wal(conn, _record):  # readers never wait for the one writer
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
        metadata.create_all(self.engine, checkfirst=True)
        self._add_new_columns()

    def _add_new_columns(self) -> None:
        """Columns added since a table was created (``create_all`` adds tables, not columns):
        nullable, so rows written before read as "not measured"."""
        inspector = db.inspect(self.engine)
        for table in metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    kind = column.type.compile(dialect=self.engine.dialect)
                    with self.engine.begin() as conn:
                        conn.execute(db.text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))

    # --- writes -------------------------------------------------------------------------------

    def _upsert(self, conn, table: db.Table, keys: dict[str, Any], values: dict[str, Any]) -> None:
        where = db.and_(*(table.c[k] == v for k, v in keys.items()))
        if conn.execute(table.update().where(where).values(**values)).rowcount == 0:
            conn.execute(table.insert().values(**keys, **values))

    def _history(self, conn, base: str, user: str, mode: str, event: str, run_id: str | None, **detail) -> None:
        conn.execute(history.insert().values(user=user, mode=mode, base_model=base, at=time.time(), run_id=run_id,
                                             event=event, detail=json.dumps(detail, sort_keys=True, default=str)))

    def register(self, names: Sequence[str]) -> list[str]:
        """Add users; returns the ones that were new (one indexed read, however many exist)."""
        names = sorted(set(names))
        if not names:
            return []
        with self.engine.begin() as conn:
            known = {r[0] for r in conn.execute(db.select(users.c.user).where(users.c.user.in_(names)))}
            new = [u for u in names if u not in known]
            if new:
                now = time.time()
                conn.execute(users.insert(), [{"user": u, "registered_at": now} for u in new])
        return new

    def record_dataset(self, user: str, mode: str, version: str, rows: int, train_rows: int,
                       run_id: str | None = None, at: float | None = None, announce: bool = True) -> None:
        """A built dataset; ``announce`` adds it to the changes the adapter sensor reads."""
        at = at or time.time()
        with self.engine.begin() as conn:
            self._upsert(conn, datasets, {"mode": mode, "user": user},
                         {"version": version, "rows": rows, "train_rows": train_rows, "built_at": at, "run_id": run_id})
            if announce:
                self._announce(conn, user, mode, version, train_rows, run_id, at)

    def announce(self, user: str, mode: str, version: str, train_rows: int, run_id: str | None = None) -> None:
        """Add a dataset version to the changes the adapter sensor reads (without rebuilding it)."""
        with self.engine.begin() as conn:
            self._announce(conn, user, mode, version, train_rows, run_id, time.time())

    def _announce(self, conn, user: str, mode: str, version: str, train_rows: int, run_id: str | None,
                  at: float) -> None:
        conn.execute(dataset_changes.insert().values(user=user, mode=mode, version=version, train_rows=train_rows,
                                                     run_id=run_id, at=at))

    def record_adapter(self, base: str, user: str, mode: str, *, trained_on: str | None, adapter_version: str,
                       steps: int | None, training: dict[str, Any], gate: dict[str, Any], run_id: str | None,
                       at: float | None = None) -> None:
        """A trained adapter and its gate verdict (``gate``: passed, reason and the three losses)."""
        at = at or time.time()
        with self.engine.begin() as conn:
            self._upsert(conn, adapters, {"mode": mode, "base_model": base, "user": user}, {
                "trained_on": trained_on, "adapter_version": adapter_version, "adapter_at": at, "steps": steps,
                "training": json.dumps(training, sort_keys=True, default=str), "gate_passed": bool(gate["passed"]),
                "gate_reason": gate.get("reason"), "base_eval_loss": gate.get("base_eval_loss"),
                "adapter_eval_loss": gate.get("adapter_eval_loss"),
                "published_eval_loss": gate.get("published_eval_loss"),
                **{k: gate.get(k) for k in ("retrieval_eval_loss", "adapter_retrieval_eval_loss", "retrieval_helps")},
                "run_id": run_id,
                **({"error": None, "error_at": None} if gate["passed"] else
                   {"error": f"eval gate failed: {gate.get('reason')}", "error_at": at}),
            })
            self._history(conn, base, user, mode, "trained" if gate["passed"] else "gate_failed", run_id,
                          adapter_version=adapter_version, trained_on=trained_on, steps=steps,
                          **{k: gate.get(k) for k in ("reason", "base_eval_loss", "adapter_eval_loss",
                                                      "retrieval_eval_loss")})

    def record_published(self, base: str, user: str, mode: str, version: str, run_id: str | None,
                         at: float | None = None) -> None:
        with self.engine.begin() as conn:
            self._upsert(conn, adapters, {"mode": mode, "base_model": base, "user": user},
                         {"published_version": version, "published_at": at or time.time(), "run_id": run_id})
            self._history(conn, base, user, mode, "published", run_id, version=version)

    def record_withdrawn(self, base: str, user: str, mode: str, reason: str, dataset_version: str | None,
                         run_id: str | None, at: float | None = None) -> None:
        with self.engine.begin() as conn:
            self._upsert(conn, adapters, {"mode": mode, "base_model": base, "user": user}, {
                "adapter_version": None, "published_version": None, "withdrawn_at": at or time.time(),
                "withdrawn_reason": reason, "trained_on": dataset_version, "run_id": run_id,
            })
            self._history(conn, base, user, mode, "withdrawn", run_id, reason=reason)

    def record_failure(self, base: str, user: str, mode: str, error: str, run_id: str | None) -> None:
        """A failure that will not go away by itself (bad data, nothing to train on)."""
        with self.engine.begin() as conn:
            self._upsert(conn, adapters, {"mode": mode, "base_model": base, "user": user},
                         {"error": error[:2000], "error_at": time.time(), "run_id": run_id})
            self._history(conn, base, user, mode, "failed", run_id, error=error[:2000])

    def record_waiting(self, base: str, user: str, mode: str, why: str, run_id: str | None) -> None:
        """Not trained for now, and no failure: too few examples to gate an adapter on."""
        with self.engine.begin() as conn:
            self._upsert(conn, adapters, {"mode": mode, "base_model": base, "user": user},
                         {"error": None, "error_at": None, "run_id": run_id})
            self._history(conn, base, user, mode, "waiting", run_id, reason=why)

    def forget(self, user: str) -> int:
        """Delete every row about ``user``; returns how many."""
        with self.engine.begin() as conn:
            return sum(conn.execute(t.delete().where(t.c.user == user)).rowcount for t in USER_TABLES)

    def prune(self, older_than_s: float) -> int:
        """Retention: drop history and dataset-change rows older than ``older_than_s`` seconds."""
        cutoff = time.time() - older_than_s
        with self.engine.begin() as conn:
            return (conn.execute(history.delete().where(history.c.at < cutoff)).rowcount
                    + conn.execute(dataset_changes.delete().where(dataset_changes.c.at < cutoff)).rowcount)

    # --- reads --------------------------------------------------------------------------------

    def run_ids_of(self, user: str) -> set[str]:
        """Every run id the user's rows name (which runs ``forget`` must clean)."""
        with self.engine.connect() as conn:
            return {r[0] for t in (datasets, dataset_changes, adapters, history)
                    for r in conn.execute(db.select(t.c.run_id).where(t.c.user == user).distinct()) if r[0]}

    def is_registered(self, user: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(db.select(users.c.user).where(users.c.user == user)).first() is not None

    def any_user(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(db.select(users.c.user).limit(1)).first() is not None

    def user_page(self, after: str | None, limit: int) -> list[str]:
        """Registered users in id order after ``after`` (an indexed range)."""
        query = db.select(users.c.user).order_by(users.c.user).limit(limit)
        if after:
            query = query.where(users.c.user > after)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def changes_after(self, after: int, limit: int) -> list[dict[str, Any]]:
        """Dataset builds after change id ``after``, oldest first."""
        query = db.select(dataset_changes).where(dataset_changes.c.id > after).order_by(dataset_changes.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]

    def last_change_id(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(db.select(db.func.max(dataset_changes.c.id))).scalar() or 0

    def datasets_of(self, mode: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """user -> their ``mode`` dataset row (version, rows, train_rows, run_id)."""
        if not names:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(db.select(datasets).where(db.and_(datasets.c.mode == mode, datasets.c.user.in_(list(names)))))
            return {r.user: dict(r._mapping) for r in rows}

    def adapters_of(self, mode: str, base: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """user -> their adapter row of ``mode`` on ``base``."""
        if not names:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(db.select(adapters).where(db.and_(
                adapters.c.mode == mode, adapters.c.base_model == base, adapters.c.user.in_(list(names)))))
            return {r.user: dict(r._mapping) for r in rows}

    def finished_in_run(self, run_id: str) -> set[tuple[str, str, str]]:
        """(base model, user, mode)s a run finished: published, withdrew or found too small to train
        (an indexed read)."""
        query = db.select(history.c.base_model, history.c.user, history.c.mode).where(
            db.and_(history.c.run_id == run_id, history.c.event.in_(["published", "withdrawn", "waiting"])))
        with self.engine.connect() as conn:
            return {tuple(r) for r in conn.execute(query)}

    def built_in_run(self, run_id: str) -> set[tuple[str, str]]:
        """(user, mode)s whose dataset a run built (an indexed read of the build log)."""
        query = db.select(dataset_changes.c.user, dataset_changes.c.mode).where(dataset_changes.c.run_id == run_id)
        with self.engine.connect() as conn:
            return {tuple(r) for r in conn.execute(query)}

    @staticmethod
    def _joined(base: str):
        """A mode's datasets with their adapter on ``base`` (none: never trained there)."""
        return d.outerjoin(a, db.and_(a.c.mode == d.c.mode, a.c.user == d.c.user, a.c.base_model == base))

    def _select(self, mode: str, base: str):
        return db.select(*ROW_COLUMNS).select_from(self._joined(base)).where(d.c.mode == mode)

    def rows(self, mode: str, base: str, users: Sequence[str]) -> dict[str, dict[str, Any]]:
        """user -> their row, for the users that have a dataset of ``mode``."""
        if not users:
            return {}
        with self.engine.connect() as conn:
            result = conn.execute(self._select(mode, base).where(d.c.user.in_(list(users))))
            return {r.user: dict(r._mapping) for r in result}

    def page(self, mode: str, base: str, after: str | None = None, limit: int = 100,
             states: Iterable[str] | None = None) -> Page:
        """Rows of ``mode`` on ``base`` in user order, after ``after``; only ``states`` if given."""
        if states is None:  # an index range of users, then their rows: never a join over the mode
            ids = db.select(datasets.c.user).where(datasets.c.mode == mode)
            if after is not None:
                ids = ids.where(datasets.c.user > after)
            with self.engine.connect() as conn:
                names = [r[0] for r in conn.execute(ids.order_by(datasets.c.user).limit(limit + 1))]
            found = self.rows(mode, base, names)
            return _cut([found[u] for u in names if u in found], limit)
        reasons = [r for r, (s, _w) in REASONS.items() if s in set(states)]
        query = self._select(mode, base).where(REASON.in_(reasons))
        if after is not None:
            query = query.where(d.c.user > after)
        with self._scanning() as conn:
            return _cut([dict(r._mapping) for r in conn.execute(query.order_by(d.c.user).limit(limit + 1))], limit)

    def counts(self, mode: str, base: str) -> dict[str, int]:
        """reason -> how many users of ``mode`` on ``base`` (one aggregate query)."""
        query = db.select(REASON, db.func.count()).select_from(self._joined(base)).where(d.c.mode == mode).group_by(REASON)
        with self._scanning() as conn:
            return {reason: n for reason, n in conn.execute(query)}

    @contextlib.contextmanager
    def _scanning(self):
        """A read transaction for the queries over a whole mode: on Postgres with memory enough
        to hash-join a mode's million rows without spilling to disk (the default work_mem,
        4 MB, made the join write temporary files)."""
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(db.text(f"SET LOCAL work_mem = '{SCAN_WORK_MEM}'"))
            yield conn

    def history(self, user: str, mode: str | None = None, base: str | None = None, limit: int = 50) -> list[dict]:
        """The newest ``limit`` history rows of ``user``, newest first."""
        query = db.select(history).where(history.c.user == user)
        if mode:
            query = query.where(history.c.mode == mode)
        if base:
            query = query.where(history.c.base_model == base)
        with self.engine.connect() as conn:
            return [{**dict(r._mapping), "detail": json.loads(r.detail or "{}")}
                    for r in conn.execute(query.order_by(history.c.id.desc()).limit(limit))]

    def training(self, base: str, user: str, mode: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            raw = conn.execute(db.select(adapters.c.training).where(
                db.and_(adapters.c.mode == mode, adapters.c.base_model == base, adapters.c.user == user))).scalar()
        return json.loads(raw) if raw else None

    def count_user_rows(self, user: str) -> int:
        with self.engine.connect() as conn:
            return sum(conn.execute(db.select(db.func.count()).select_from(t).where(t.c.user == user)).scalar()
                       for t in USER_TABLES)


@functools.lru_cache(maxsize=8)
def open_state(url: str) -> StateStore:
    """One engine (and one schema check) per URL and process."""
    return StateStore(url)
