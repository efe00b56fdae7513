"""Small shared state kept in the Dagster instance's key-value store: retired base models,
requested backfills and forgotten users. One indexed read per tick; written by the CLI (and the
Python API)."""

from __future__ import annotations

import json
import time
import uuid

from dagster import DagsterInstance

from lora_assets.orchestration.partitions import base_model_partitions

RETIRED_KEY = "lora_assets/retired_base_models"
BACKFILLS_KEY = "lora_assets/backfills"
FORGOTTEN_KEY = "lora_assets/forgotten_users"


def _read(instance: DagsterInstance, key: str):
    raw = instance.run_storage.get_cursor_values({key}).get(key)
    return json.loads(raw) if raw else None


def _write(instance: DagsterInstance, key: str, value) -> None:
    instance.run_storage.set_cursor_values({key: json.dumps(value, sort_keys=True)})


def retired_base_models(instance: DagsterInstance) -> set[str]:
    return set(_read(instance, RETIRED_KEY) or [])


def set_base_model_retired(instance: DagsterInstance, key: str, retired: bool) -> None:
    current = retired_base_models(instance)
    _write(instance, RETIRED_KEY, sorted(current | {key} if retired else current - {key}))


def active_base_models(instance: DagsterInstance) -> list[str]:
    retired = retired_base_models(instance)
    return [k for k in instance.get_dynamic_partitions(base_model_partitions.name) if k not in retired]


def request_backfill(instance: DagsterInstance, settings, base_model: str) -> str:
    """Ask the adapter sensor to train every user's adapters on ``base_model``; returns its id.

    The sensor plans it page by page of users (only (user, mode) pairs with training data that
    are not already trained on it) and launches batch runs while the training queue has room.
    """
    if not instance.has_dynamic_partition(base_model_partitions.name, base_model):
        raise ValueError(f"base model {base_model!r} is not registered: run `lora-assets base-model add {base_model}`")
    if base_model in retired_base_models(instance):
        raise ValueError(f"base model {base_model!r} is retired: `lora-assets base-model add {base_model}` reactivates it")
    if not settings.state().any_user():
        raise ValueError("no users registered yet: ingest some data first")
    backfill_id = f"{base_model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    requests = backfill_requests(instance)
    requests[backfill_id] = {"base_model": base_model, "requested_at": time.time()}
    _write(instance, BACKFILLS_KEY, requests)
    return backfill_id


def backfill_requests(instance: DagsterInstance) -> dict[str, dict]:
    return _read(instance, BACKFILLS_KEY) or {}


def forgotten_among(instance: DagsterInstance, users) -> set[str]:
    """Which of ``users`` were erased with ``lora-assets forget`` (their later changes are dropped).

    One key per user, read only for the users a tick or run touches: the set of forgotten users
    grows without bound, and no tick should read all of it.
    """
    users = set(users)
    if not users:
        return set()
    found = instance.run_storage.get_cursor_values({f"{FORGOTTEN_KEY}/{u}" for u in users})
    return {key.rsplit("/", 1)[1] for key, value in found.items() if value}


def is_forgotten(instance: DagsterInstance, user: str) -> bool:
    return user in forgotten_among(instance, [user])


def mark_forgotten(instance: DagsterInstance, user: str) -> None:
    instance.run_storage.set_cursor_values({f"{FORGOTTEN_KEY}/{user}": json.dumps({"forgotten_at": time.time()})})
