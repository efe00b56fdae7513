"""Erasing a user's data from the stores this project owns (no Dagster here).

The user store, the datasets, the user's drive (every version and pointer), the adapter working
copies and published copies on this machine's data dir, and the change feed's pending events
and dead letters that name the user, and their rows of the per-user state table. Other users' objects are never touched: every delete is
under the user's own prefix, or a feed entry whose payload names the user.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from lora_assets.data.user_store import validate_user_id
from lora_assets.settings import Settings


@dataclass
class Erased:
    """What an erasure removed, by kind (counts of objects, folders or events)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n: int) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _delete_prefix(objects, user: str) -> int:
    keys = objects.list(user)
    for key in keys:
        objects.delete(key)
    return len(keys)


def erase_user_data(settings: Settings, user: str, erased: Erased | None = None) -> Erased:
    """Delete everything of ``user`` in the stores and the data dir; idempotent."""
    validate_user_id(user)
    erased = erased or Erased()
    erased.add("store objects (records)", _delete_prefix(settings.store().objects, user))
    erased.add("datasets", _delete_prefix(settings.datasets(), user))
    erased.add("drive objects (adapter versions and CURRENT pointers)", _delete_prefix(settings.drive(), user))
    folders = 0
    for kind in ("adapters", "published"):  # working copies and warm-start copies, per base model
        root = settings.home / kind
        for folder in root.glob(f"*/{user}") if root.is_dir() else ():
            shutil.rmtree(folder, ignore_errors=True)
            folders += 1
    erased.add("adapter working copies", folders)
    pending, dead = settings.feed().forget(user)
    erased.add("pending change events", pending)
    erased.add("dead letters", dead)
    erased.add("state table rows (datasets, adapters, history)", settings.state().forget(user))
    return erased


def remaining_user_data(settings: Settings, user: str) -> list[str]:
    """What is still stored for ``user`` (empty after a complete erasure)."""
    left = [*settings.store().objects.list(user), *settings.datasets().list(user), *settings.drive().list(user)]
    for kind in ("adapters", "published"):
        root = settings.home / kind
        left.extend(str(p) for p in (root.glob(f"*/{user}") if root.is_dir() else ()))
    if rows := settings.state().count_user_rows(user):
        left.append(f"{rows} state table rows")
    return left
