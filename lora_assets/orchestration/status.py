"""Who is fresh: per base model x user x mode, the dataset, the adapter, its gate and what is
published, and whether the adapter is current with the data (``lora-assets status``).

Everything comes from the per-user state table (``lora_assets.state``): one user is a few
indexed reads, a whole mode one aggregate query for the counts by state and one indexed page of
users; plus the live adapter runs (bounded by the queue) and, for one user, the latest failed
runs (bounded). Neither grows with the number of registered users beyond the aggregate itself.

The JSON form (``--json``) is a stable interface, ``STATUS_SCHEMA`` version 1: keys are only ever
added, never renamed or removed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus, RunsFilter

from lora_assets.modes import MODES
from lora_assets.orchestration.batches import ADAPTER_BATCH_JOB, batch_users
from lora_assets.orchestration.internals import NOT_FINISHED_STATUSES
from lora_assets.orchestration.keys import ATTEMPT_TAG, RETRY_OF_TAG, RETRY_REASON_TAG
from lora_assets.orchestration.registry import active_base_models
from lora_assets.state import REASONS, STATES
from lora_assets.state import why as state_words

STATUS_SCHEMA = 1
PAGE = 256  # users listed per mode and base model (the CLI asks for 50)
FAILED_RUNS_SCANNED = 200  # the newest failed batch runs searched for a user's last failure

# States, from best to worst.
FRESH = "fresh"  # the published adapter was trained on the current dataset
UPDATING = "updating"  # a run in flight trains it on the current dataset
STALE = "stale"  # the data changed (or training or the gate failed) and nothing is on the way yet
NO_DATA = "no_data"  # no training example: nothing to learn, nothing published
WITHDRAWN = "withdrawn"  # its data was deleted: the adapter was removed from the drive


@dataclass
class Gate:
    passed: bool
    reason: str
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    published_eval_loss: float | None
    at: float
    retrieval_eval_loss: float | None = None  # the base shown the user's most similar examples
    adapter_retrieval_eval_loss: float | None = None  # the adapter shown them
    retrieval_helps: bool | None = None  # adapter + retrieval beats the adapter alone (with confidence)


@dataclass
class AdapterStatus:
    base_model: str
    user: str
    mode: str
    state: str
    why: str
    dataset_version: str | None = None
    train_rows: int | None = None
    trained_on: str | None = None  # the dataset version the latest adapter was trained on
    adapter_version: str | None = None
    adapter_at: float | None = None
    published_version: str | None = None
    published_at: float | None = None
    gate: Gate | None = None
    run_in_flight: str | None = None
    last_failure: dict[str, Any] | None = None
    training: dict[str, Any] | None = None  # with --user: how it was trained (steps, timings, path, examples)


@dataclass
class StatusReport:
    adapters: list[AdapterStatus]
    pending_events: int | None
    dead_letters: int | None
    live_runs: int
    summaries: list[ModeSummary] = field(default_factory=list)  # per mode x base model, when not one user
    next_after: dict[str, str] = field(default_factory=dict)  # "mode|base" -> the user the next page starts after
    generated_at: float = field(default_factory=time.time)

    def totals(self) -> dict[str, int]:
        """Adapters by state: of every user when summarised, else of the rows listed."""
        out = dict.fromkeys(STATES, 0)
        if self.summaries:
            for summary in self.summaries:
                for state, n in summary.counts.items():
                    out[state] += n
            return out
        for a in self.adapters:
            out[a.state] += 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATUS_SCHEMA,
            "generated_at": self.generated_at,
            "feed": {"pending_events": self.pending_events, "dead_letters": self.dead_letters},
            "live_adapter_runs": self.live_runs,
            "totals": self.totals(),
            "summary": [asdict(s) for s in self.summaries],
            "next_after": self.next_after,
            "adapters": [asdict(a) for a in self.adapters],
        }


def _failures(instance: DagsterInstance, users: set[str]) -> dict[str, dict[str, Any]]:
    """user -> their newest failed batch run among the newest failed ones (run id, job, time, error)."""
    out: dict[str, dict[str, Any]] = {}
    runs = instance.get_run_records(
        RunsFilter(statuses=[DagsterRunStatus.FAILURE], job_name=None), limit=FAILED_RUNS_SCANNED
    )
    for record in runs:
        run = record.dagster_run
        listed = (batch_users(run) or set()) & users
        if not listed - set(out):
            continue
        failures = instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE)
        error = failures[-1].dagster_event.step_failure_data.error if failures else None
        message = (error.message.strip().splitlines() or [""])[0][:300] if error else ""
        for user in listed - set(out):
            out[user] = {"run_id": run.run_id, "job": run.job_name,
                         "at": record.end_time or record.update_timestamp.timestamp(), "error": message}
    return out


@dataclass(frozen=True)
class LiveRun:
    run_id: str
    retry: str | None = None  # on a retry: its attempt, the run it redoes and why that one failed


def live_adapter_runs(instance: DagsterInstance) -> dict[tuple[str, str, str], LiveRun]:
    """(base model, user, mode) -> the live adapter run training it (bounded by the queue)."""
    flying: dict[tuple[str, str, str], LiveRun] = {}
    for run in instance.get_runs(RunsFilter(job_name=ADAPTER_BATCH_JOB, statuses=list(NOT_FINISHED_STATUSES))):
        config = run.run_config["ops"]["train_adapters"]["config"]
        retry = (f"attempt {run.tags.get(ATTEMPT_TAG, '?')}, redoing run {run.tags[RETRY_OF_TAG]}, which failed: "
                 f"{run.tags.get(RETRY_REASON_TAG, 'unknown')}") if RETRY_OF_TAG in run.tags else None
        for item in config["items"]:
            flying[(config["base_model"], item["user"], item["mode"])] = LiveRun(run.run_id, retry)
    return flying


def _gate(row: dict[str, Any]) -> Gate | None:
    if row.get("adapter_version") is None or row.get("gate_passed") is None:
        return None
    return Gate(bool(row["gate_passed"]), row.get("gate_reason") or "", row.get("base_eval_loss"),
                row.get("adapter_eval_loss"), row.get("published_eval_loss"), row.get("adapter_at"),
                row.get("retrieval_eval_loss"), row.get("adapter_retrieval_eval_loss"),
                None if row.get("retrieval_helps") is None else bool(row["retrieval_helps"]))


def to_status(base: str, mode: str, row: dict[str, Any], live: LiveRun | None = None,
              failure: dict[str, Any] | None = None) -> AdapterStatus:
    """A state-table row (``lora_assets.state.ROW_COLUMNS``) as ``status`` shows it."""
    run_id = live.run_id if live else None
    state, why = state_words(row)
    out = AdapterStatus(
        base, row["user"], mode, state, why, dataset_version=row.get("dataset_version"),
        train_rows=row.get("train_rows"), trained_on=row.get("trained_on"),
        adapter_version=row.get("adapter_version"), adapter_at=row.get("adapter_at"),
        published_version=row.get("published_version"), published_at=row.get("published_at"),
        gate=_gate(row), run_in_flight=run_id, last_failure=failure,
    )
    if out.state == STALE and live:
        out.state, out.why = UPDATING, f"{out.why}; run {run_id} is training it" + (
            f" ({live.retry})" if live.retry else "")
    return out


def user_status(settings, instance: DagsterInstance, user: str, modes: Sequence[str], bases: Sequence[str],
                flying: dict[tuple[str, str, str], LiveRun]) -> list[AdapterStatus]:
    """Every (base model, mode) of one user: a few indexed reads, whatever the number of users."""
    state = settings.state()
    failure = _failures(instance, {user}).get(user)
    out = []
    for mode in modes:
        for base in bases:
            row = state.rows(mode, base, [user]).get(user) or {"user": user, "reason": "no_dataset"}
            out.append(to_status(base, mode, row, flying.get((base, user, mode)), failure))
            out[-1].training = state.training(base, user, mode)
    return out


@dataclass
class ModeSummary:
    mode: str
    base_model: str
    counts: dict[str, int]  # state -> users


def mode_summary(settings, mode: str, base: str, flying: dict[tuple[str, str, str], LiveRun]) -> ModeSummary:
    """Counts by state of one mode on one base model: one aggregate query, plus one indexed read
    of the adapters in flight (bounded by the run queue) to tell updating from stale."""
    state = settings.state()
    counts = dict.fromkeys(STATES, 0)
    for reason, n in state.counts(mode, base).items():
        counts[REASONS[reason][0]] += n
    in_flight = [u for (b, u, m) in flying if b == base and m == mode]
    for row in state.rows(mode, base, in_flight).values():
        if state_words(row)[0] == STALE:
            counts[STALE] -= 1
            counts[UPDATING] += 1
    return ModeSummary(mode, base, counts)
def status(
    instance: DagsterInstance,
    settings,
    feed=None,
    user: str | None = None,
    mode: str | None = None,
    base_model: str | None = None,
    after: str | None = None,
    limit: int = PAGE,
    states: Sequence[str] | None = None,
) -> StatusReport:
    """The report ``lora-assets status`` prints; ``feed`` (optional) adds pending events and dead letters.

    One user: every (base model, mode) of theirs. Otherwise: per mode and base model, counts by
    state and one page of ``limit`` users after ``after`` (only ``states`` if given).
    """
    modes = [mode] if mode else list(MODES)
    bases = [base_model] if base_model else active_base_models(instance)
    flying = live_adapter_runs(instance)  # read once: bounded by the run queue
    summaries: list[ModeSummary] = []
    next_after: dict[str, str] = {}
    if user is not None:
        rows = user_status(settings, instance, user, modes, bases, flying)
    else:
        rows = []
        for m in modes:
            for base in bases:
                summaries.append(mode_summary(settings, m, base, flying))
                wanted = None if states is None else set(states) | ({STALE} if UPDATING in states else set())
                page = settings.state().page(m, base, after, limit, wanted)
                shown = [to_status(base, m, r, flying.get((base, r["user"], m))) for r in page.rows]
                rows.extend(r for r in shown if states is None or r.state in states)
                if page.next_after:
                    next_after[f"{m}|{base}"] = page.next_after
    pending = feed.pending_count() if feed is not None else None
    dead = len(feed.dead_letters()) if feed is not None else None
    return StatusReport(rows, pending, dead, len({r.run_id for r in flying.values()}), summaries=summaries,
                        next_after=next_after)
