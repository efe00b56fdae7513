"""The user's own most similar past replies in the prompt, for the versions where they help.

The gate scores every SFT adapter with and without the user's ``retrieval_k`` most similar
training examples in the prompt and records in the version's ``lora_assets.json``
(``held_out.retrieval_helps``) whether adapter + retrieval beats the adapter alone with 95 %
confidence. For such a version the server sends what the gate scored: the last user message
followed by those replies (``training.retrieval.with_retrieved``, the same TF-IDF retriever).

- **Which versions** (``serve_retrieval``): ``helps`` (default) the ones that record it,
  ``always`` every SFT adapter (a deployment that wants it regardless), ``never``.
- **From the user's current dataset**, never a copy: its training split, checked by etag (a
  HEAD request on S3) once the cached copy is ``refresh_s`` old, downloaded again only when it
  moved. So a deleted mail leaves the prompts within ``refresh_s`` of the dataset rebuild that
  drops it, and a forgotten user's (deleted) dataset shows nothing.
- **Best effort**: an unreadable dataset, or a prompt too long for the context with the replies,
  is answered without them (and logged), never failed; the response says how many it showed
  (header ``X-Lora-Assets-Retrieved``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from lora_assets.settings import SERVE_RETRIEVAL_POLICIES
from lora_assets.storage import ObjectStore, storage_errors
from lora_assets.training.retrieval import Retriever

log = logging.getLogger(__name__)

POLICIES = SERVE_RETRIEVAL_POLICIES
HEADER = "X-Lora-Assets-Retrieved"  # how many of the user's examples the prompt showed


def examples_to_show(policy: str, held_out: Mapping | None, sft: bool, default_k: int) -> int:
    """How many retrieved examples a version is served with: its recorded ``retrieval_k`` where
    the gate found they help (or always, by policy); none for DPO modes or ``never``."""
    if policy not in POLICIES:
        raise ValueError(f"serve_retrieval must be one of {', '.join(POLICIES)}, not {policy!r}")
    held_out = held_out or {}
    if not sft or policy == "never" or (policy == "helps" and not held_out.get("retrieval_helps")):
        return 0
    return int(held_out.get("retrieval_k") or default_k)


class UserRetrievers:
    """A ``Retriever`` per (user, mode) over the user's current dataset, LRU-bounded, re-checked
    every ``refresh_s``: by the dataset's etag, downloaded and rebuilt into a retriever only when it moved."""

    def __init__(self, datasets: ObjectStore, refresh_s: float, capacity: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.datasets = datasets
        self.refresh_s = refresh_s
        self.capacity = max(1, capacity)
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: OrderedDict[tuple[str, str], tuple[str | None, float, Retriever | None]] = OrderedDict()

    def get(self, user: str, mode: str) -> Retriever | None:
        """The user's retriever for the mode, or None when they have no training example."""
        from lora_assets.datasets import dataset_object_key

        key, now = (user, mode), self._clock()
        with self._lock:
            cached = self._cached.get(key)
        if cached is not None and now - cached[1] < self.refresh_s:
            return cached[2]
        object_key = dataset_object_key(user, mode)
        etag = self.datasets.etag(object_key)  # a HEAD on S3: the dataset is downloaded only when it moved
        if etag is None:  # no dataset (a forgotten user's is deleted): nothing to show
            retriever = None
        elif cached is not None and cached[0] == etag:
            retriever = cached[2]
        else:
            found = self.datasets.get_with_etag(object_key)
            etag, retriever = (found[1], self._build(found[0])) if found else (None, None)
        with self._lock:
            self._cached[key] = (etag, now, retriever)
            self._cached.move_to_end(key)
            while len(self._cached) > self.capacity:
                self._cached.popitem(last=False)
        return retriever

    @staticmethod
    def _build(data: bytes) -> Retriever | None:
        from lora_assets.adapters import examples_from
        from lora_assets.datasets import decode_dataset

        train = examples_from(decode_dataset(data)[0], "train")
        return Retriever(train) if train else None

    def similar(self, user: str, mode: str, query: str, k: int) -> list:
        """Up to ``k`` of the user's examples most like ``query``; none when the dataset cannot be read."""
        try:
            retriever = self.get(user, mode)
        except (OSError, ValueError, KeyError, *storage_errors()) as exc:
            log.warning("serving %s/%s without retrieved examples: its dataset could not be read (%s)", user, mode, exc)
            return []
        return retriever.similar(query, k) if retriever is not None else []


__all__ = ["HEADER", "POLICIES", "UserRetrievers", "examples_to_show"]
