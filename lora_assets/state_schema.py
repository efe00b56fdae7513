"""The tables of the per-user state (``state.py`` reads and writes them): their columns and
indexes in one place, so a new column is declared once and ``StateStore`` adds it to an older
table on open. No dagster here.
"""

from __future__ import annotations

import sqlalchemy as db

metadata = db.MetaData()

users = db.Table(
    "lora_users", metadata,
    db.Column("user", db.String(128), primary_key=True),
    db.Column("registered_at", db.Float, nullable=False),
)

datasets = db.Table(
    "lora_datasets", metadata,
    db.Column("mode", db.String(64), primary_key=True),
    db.Column("user", db.String(128), primary_key=True),
    db.Column("version", db.String(80), nullable=False),
    db.Column("rows", db.Integer, nullable=False),
    db.Column("train_rows", db.Integer, nullable=False),
    db.Column("built_at", db.Float, nullable=False),
    db.Column("run_id", db.String(64)),
)

adapters = db.Table(
    "lora_adapters", metadata,
    db.Column("mode", db.String(64), primary_key=True),
    db.Column("base_model", db.String(64), primary_key=True),
    db.Column("user", db.String(128), primary_key=True),
    db.Column("trained_on", db.String(80)),  # the dataset version the latest adapter was trained on
    db.Column("adapter_version", db.String(80)),  # its sha256; NULL once withdrawn
    db.Column("adapter_at", db.Float),
    db.Column("steps", db.Integer),
    db.Column("training", db.Text),  # JSON: how it was trained (path, examples, timings)
    db.Column("gate_passed", db.Boolean),
    db.Column("gate_reason", db.Text),
    db.Column("base_eval_loss", db.Float),
    db.Column("adapter_eval_loss", db.Float),
    db.Column("published_eval_loss", db.Float),
    db.Column("retrieval_eval_loss", db.Float),  # the base shown the user's similar examples (the baseline)
    db.Column("adapter_retrieval_eval_loss", db.Float),  # the adapter shown them
    db.Column("retrieval_helps", db.Boolean),  # adapter + retrieval beats the adapter alone (serving may add them)
    db.Column("published_version", db.String(80)),  # NULL: nothing published (or withdrawn)
    db.Column("published_at", db.Float),
    db.Column("withdrawn_at", db.Float),
    db.Column("withdrawn_reason", db.Text),
    db.Column("run_id", db.String(64)),  # the run that last wrote this row
    db.Column("error", db.Text),  # the last failure that will not go away by itself, if any
    db.Column("error_at", db.Float),
)

history = db.Table(
    "lora_adapter_history", metadata,
    db.Column("id", db.Integer, primary_key=True, autoincrement=True),
    db.Column("user", db.String(128), nullable=False),
    db.Column("mode", db.String(64), nullable=False),
    db.Column("base_model", db.String(64), nullable=False),
    db.Column("at", db.Float, nullable=False),
    db.Column("run_id", db.String(64)),
    db.Column("event", db.String(32), nullable=False),  # trained, gate_failed, published, withdrawn, failed, waiting
    db.Column("detail", db.Text),  # JSON
    db.Index("lora_adapter_history_by_user", "user", "mode", "base_model", "id"),
    db.Index("lora_adapter_history_by_time", "at"),
)

# Every dataset build, in order: the adapter sensor reads it after its cursor (an indexed id
# range), so its tick costs what changed, not how many users exist. Pruned by age.
dataset_changes = db.Table(
    "lora_dataset_changes", metadata,
    db.Column("id", db.Integer, primary_key=True, autoincrement=True),
    db.Column("user", db.String(128), nullable=False),
    db.Column("mode", db.String(64), nullable=False),
    db.Column("version", db.String(80), nullable=False),
    db.Column("train_rows", db.Integer, nullable=False),
    db.Column("run_id", db.String(64)),
    db.Column("at", db.Float, nullable=False),
    db.Index("lora_dataset_changes_by_time", "at"),
    db.Index("lora_dataset_changes_by_run", "run_id"),
)

db.Index("lora_history_by_run", history.c.run_id)

# Every table with a row per user: what ``forget`` erases and the scale benchmark counts.
USER_TABLES = (users, datasets, dataset_changes, adapters, history)
