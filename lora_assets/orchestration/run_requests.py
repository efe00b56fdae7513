"""What the sensors ask Dagster for, and what the run queue already holds.

Batch run requests of exactly the users and modes that changed (``users_per_run`` users each,
run keys that make a repeated tick harmless), the adapters the queue is already training, how
many training runs it lets run at once, and a backfill's next page of users. Plain functions
over ``Settings`` and the instance, so ``sensors.py`` keeps only the sensors: their cursors,
their failure handling and their logs.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunRequest, RunsFilter

from lora_assets.modes import MODES
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, DATASET_BATCH_JOB
from lora_assets.orchestration.internals import NOT_FINISHED_STATUSES
from lora_assets.orchestration.keys import MAX_RUNTIME_TAG, TRAINING_TAG, TRIGGER_TAG, USERS_TAG



def users_tag(users: Sequence[str]) -> str:
    """The users of a batch, for the run list (tag values are kept short)."""
    text = ",".join(users)
    return text if len(text) <= 200 else f"{text[:180].rsplit(',', 1)[0]},... ({len(users)} users)"


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    """``items`` in runs of at most ``size`` (``users_per_run``)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def digest(value) -> str:
    """A short stable hash for run keys: the same pending work asks for the same run twice, harmlessly."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run_config_of(run: DagsterRun, op_name: str) -> dict:
    """The config a batch run was launched with (what it was asked to do)."""
    return run.run_config["ops"][op_name]["config"]


def dataset_request(users: Sequence[str], sources: dict[str, set[str]], run_key: str, tags: dict) -> RunRequest:
    """A dataset batch run re-reading exactly each user's changed ``sources``."""
    return RunRequest(
        job_name=DATASET_BATCH_JOB,
        run_key=run_key,
        run_config={"ops": {"rebuild_datasets": {"config": {
            "users": [{"user": u, "sources": sorted(sources[u])} for u in users]
        }}}},
        tags={**tags, USERS_TAG: users_tag(users), "lora_assets/batch_size": str(len(users))},
    )


def trained_versions(settings, mode: str, base: str, users: Sequence[str]) -> dict[str, str]:
    """user -> the dataset version their latest ``mode`` adapter on ``base`` was trained on."""
    return {u: r["trained_on"] for u, r in settings.state().adapters_of(mode, base, users).items() if r["trained_on"]}


def training_slots(instance: DagsterInstance) -> int:
    """How many training runs the run queue lets run at once: the limit on ``TRAINING_TAG`` in
    the instance's ``tag_concurrency_limits`` (1 on the embedded default, the GPU count at scale),
    else its ``max_concurrent_runs``."""
    config = instance.get_concurrency_config().run_queue_config
    if config is None:
        return 1
    limits = [int(c["limit"]) for c in config.tag_concurrency_limits or () if c.get("key") == TRAINING_TAG]
    if limits:
        return max(1, min(limits))
    return config.max_concurrent_runs if config.max_concurrent_runs > 0 else 1  # -1: no limit


@dataclass(frozen=True)
class InFlight:
    """The adapter batch runs not finished yet (bounded by the queue, not by the users)."""

    items: frozenset[tuple[str, str, str, str]]  # (base model, user, mode, dataset version)
    runs: int
    waiting: int  # change-triggered runs queued, not started: new changes can join the next batch instead


def in_flight(instance: DagsterInstance) -> InFlight:
    """What the unfinished adapter batch runs are training, so a tick does not ask for it again."""
    runs = instance.get_runs(RunsFilter(job_name=ADAPTER_BATCH_JOB, statuses=list(NOT_FINISHED_STATUSES)))
    items = set()
    for run in runs:
        config = run_config_of(run, "train_adapters")
        items.update((config["base_model"], i["user"], i["mode"], i.get("dataset_version", "")) for i in config["items"])
    waiting = sum(
        r.status in (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED) and r.tags.get(TRIGGER_TAG) == "dataset_changed"
        for r in runs
    )
    return InFlight(frozenset(items), len(runs), waiting)


@dataclass
class PendingTraining:
    """Adapters to train, grouped by base model: (user, mode) -> dataset version."""

    items: dict[str, dict[tuple[str, str], str]]

    @classmethod
    def empty(cls) -> PendingTraining:
        return cls(defaultdict(dict))

    def add(self, base: str, user: str, mode: str, version: str) -> None:
        self.items[base][(user, mode)] = version

    def requests(self, settings, key: str, tags: dict[str, str]) -> list[RunRequest]:
        """Batch runs of up to ``users_per_run`` users, each failed (and its work requested again)
        if it is still going after ``training_max_runtime_s`` (Dagster's run monitoring)."""
        users_per_run = settings.users_per_run
        tags = {**tags, MAX_RUNTIME_TAG: str(settings.training_max_runtime_s)}
        out = []
        for base, work in sorted(self.items.items()):
            users = sorted({u for u, _ in work})
            for i, chunk in enumerate(chunks(users, users_per_run)):
                members = set(chunk)
                items = [{"user": u, "mode": m, "dataset_version": v} for (u, m), v in sorted(work.items()) if u in members]
                out.append(
                    RunRequest(
                        job_name=ADAPTER_BATCH_JOB,
                        run_key=f"{key}:{base}:{i}:{digest(items)}",
                        run_config={"ops": {"train_adapters": {"config": {"base_model": base, "items": items}}}},
                        tags={**tags, "lora_assets/base_model": base, USERS_TAG: users_tag(chunk),
                              "lora_assets/batch_size": str(len(chunk)),
                              "lora_assets/modes": ",".join(sorted({i["mode"] for i in items}))},
                    )
                )
        return out


def plan_backfill_page(
    settings, base: str, after: str | None, max_users: int, flying: set = frozenset()
) -> tuple[PendingTraining, str, dict[str, int]]:
    """The next page of a backfill: (user, mode)s with training data not yet trained on ``base``.

    Returns the work, the new position ("done" at the end) and, per mode, how many users of the
    page were skipped for having no training data for it. Cost: one indexed page of users plus
    two indexed reads per mode, however many users exist.
    """
    state = settings.state()
    users = state.user_page(after, max_users)
    pending, skipped = PendingTraining.empty(), {}
    for mode in MODES:
        with_data = {u: r["version"] for u, r in state.datasets_of(mode, users).items() if r["train_rows"]}
        skipped[mode] = len(users) - len(with_data)
        trained = trained_versions(settings, mode, base, list(with_data))
        for user, version in with_data.items():
            if trained.get(user) != version and (base, user, mode, version) not in flying:
                pending.add(base, user, mode, version)
    position = users[-1] if len(users) == max_users else "done"
    return pending, position, {m: n for m, n in skipped.items() if n}
