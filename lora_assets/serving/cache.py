"""Which adapters are resident, which version each user's CURRENT names, and leases on both.

- **Bounded**: ``max_adapters`` slots; a miss loads the version into a free slot or evicts the
  least recently used adapter no request is using (hit, miss, eviction counts for ``/metrics``).
- **Fresh**: a user's CURRENT is re-read when the cached pointer is older than ``refresh_s``, on
  the next request for it and by ``sweep`` (the server calls it every ``refresh_s``). So within
  ``refresh_s`` of CURRENT moving, new requests get the new version, or "no adapter" after a
  withdrawal or a forget; an adapter that is no longer current leaves memory once its last
  request ends.
- **One version per response**: a request leases one (user, mode, version) slot for its whole
  life; that slot is not evicted or rewritten until the lease is released.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lora_assets.serving.adapters import Pointer, Unservable
from lora_assets.serving.slots import BASE_SLOT, AdapterSlots, AdapterWeights
from lora_assets.storage import storage_errors

Key = tuple[str, str]  # (user, mode)


class NoAdapter(LookupError):
    """Nothing is published for this user and mode (or it was withdrawn, or the user forgotten)."""


class SlotsBusy(RuntimeError):
    """Every slot holds an adapter that a request in flight is using."""


@dataclass
class _Entry:
    slot: int
    refs: int = 0
    current: bool = True  # False: CURRENT moved on; freed when its last lease ends
    held_out: Mapping = field(default_factory=dict)  # the version's gate figures


@dataclass(frozen=True)
class Lease:
    slot: int
    version: str | None  # None for the base model
    key: tuple[str, str, str] | None = None
    held_out: Mapping = field(default_factory=dict, compare=False)  # the version's gate figures (whether retrieval helps)


BASE_LEASE = Lease(BASE_SLOT, None)


class AdapterCache:
    def __init__(self, slots: AdapterSlots, read_pointer: Callable[[str, str], Pointer],
                 load: Callable[[str, str, Pointer], AdapterWeights], refresh_s: float,
                 wait_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.slots = slots
        self.capacity = slots.slots - 1  # slot 0 is the base model
        self._read_pointer = read_pointer
        self._load = load
        self.refresh_s = refresh_s
        self.wait_s = wait_s
        self._clock = clock
        self._cond = threading.Condition()
        self._entries: OrderedDict[tuple[str, str, str], _Entry] = OrderedDict()  # LRU first
        self._pointers: dict[Key, tuple[Pointer, float]] = {}
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}
        self._free = list(range(self.capacity, 0, -1))
        self.hits = self.misses = self.evictions = 0

    @property
    def resident(self) -> int:
        return len(self._entries)

    def resident_keys(self) -> list[tuple[str, str, str]]:
        with self._cond:
            return list(self._entries)

    def pointer(self, user: str, mode: str) -> Pointer:
        """The user's CURRENT, re-read once the cached copy is ``refresh_s`` old."""
        now = self._clock()
        with self._cond:
            cached = self._pointers.get((user, mode))
        if cached is not None and now - cached[1] < self.refresh_s:
            return cached[0]
        fresh = self._read_pointer(user, mode)
        with self._cond:
            self._pointers[(user, mode)] = (fresh, now)
            for key, entry in list(self._entries.items()):  # versions no longer current go
                if key[:2] == (user, mode) and key[2] != fresh.version:
                    entry.current = False
                    self._free_if_unused(key)
        return fresh

    def lease(self, user: str, mode: str) -> Lease:
        """A slot holding the user's current version, loaded from the drive on a miss."""
        pointer = self.pointer(user, mode)
        if pointer.version is None:
            raise NoAdapter(f"no {mode} adapter for {user}")
        key = (user, mode, pointer.version)
        with self._cond:
            if key in self._entries:
                self.hits += 1
                return self._take(key)
            self.misses += 1
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:  # concurrent misses for one version load it once
            try:
                with self._cond:
                    if key in self._entries:
                        return self._take(key)
                weights = self._load(user, mode, pointer)
                try:
                    self.slots.check(weights)
                except ValueError as exc:
                    raise Unservable(f"{user}/{mode} version {pointer.version}: {exc}") from None
                with self._cond:
                    if key in self._entries:  # loaded by a request that raced this one
                        return self._take(key)
                    slot = self._slot_for(key)  # may wait, releasing the lock
                    if key in self._entries:
                        self._free.append(slot)
                        return self._take(key)
                    self.slots.write(slot, weights)
                    self._entries[key] = _Entry(slot, held_out=weights.held_out)
                    return self._take(key)
            finally:
                with self._cond:
                    if self._loading.get(key) is lock:
                        del self._loading[key]

    def release(self, lease: Lease) -> None:
        if lease.key is None:
            return
        with self._cond:
            entry = self._entries.get(lease.key)
            if entry is not None:
                entry.refs -= 1
                self._free_if_unused(lease.key)
            self._cond.notify_all()

    def sweep(self) -> None:
        """Re-read the CURRENT of every resident adapter whose pointer is due (bounds how long a
        withdrawn or forgotten adapter stays in memory when nobody asks for it)."""
        with self._cond:
            due = {k[:2] for k in self._entries}
        for user, mode in due:
            try:
                self.pointer(user, mode)
            except (OSError, ValueError, *storage_errors()):
                continue  # an unreadable pointer keeps what is resident until it reads again

    # --- under the lock -----------------------------------------------------------------------

    def _take(self, key: tuple[str, str, str]) -> Lease:
        entry = self._entries[key]
        entry.refs += 1
        self._entries.move_to_end(key)
        return Lease(entry.slot, key[2], key, entry.held_out)

    def _slot_for(self, key: tuple[str, str, str]) -> int:
        deadline = self._clock() + self.wait_s
        while True:
            if self._free:
                return self._free.pop()
            victim = next((k for k, e in self._entries.items() if e.refs == 0), None)
            if victim is not None:
                self.evictions += 1
                return self._entries.pop(victim).slot
            if not self._cond.wait(timeout=max(0.0, deadline - self._clock())):
                raise SlotsBusy(f"all {self.capacity} adapter slots are in use by requests in flight")

    def _free_if_unused(self, key: tuple[str, str, str]) -> None:
        entry = self._entries[key]
        if not entry.current and entry.refs == 0:
            del self._entries[key]
            self.slots.write(entry.slot, None)  # a withdrawn adapter's tensors do not linger
            self._free.append(entry.slot)


__all__ = ["AdapterCache", "BASE_LEASE", "Lease", "NoAdapter", "SlotsBusy", "Unservable"]
