"""Sensors: change feed -> dataset batch runs, and changed datasets -> adapter batch runs.

Both do work proportional to what is pending, never to how many users exist: the change sensor
reads feed events after its cursor; the adapter sensor reads the state table's dataset changes
after its cursor (an indexed id range), the training runs still in the queue, and the runs that
failed since its last tick. Declarative automation (``AutomationCondition.eager()``) would do
the adapter half too, but its tick evaluates every partition (~0.5 ms per user here, a minute
per tick at 100k users), and it launches one run per partition.

Each tick groups everything pending into batch runs of up to ``users_per_run`` users
(``run_requests.py``; the jobs are in ``batches.py``): exactly the users and modes that changed,
never a range.

Nothing is lost. A feed event is acknowledged once its batch run has been *created* (the run's
config then holds the change, in Dagster's storage); from then on the run is what must
succeed. Every tick also reads the runs that failed since the last one: a run the daemon will
retry (``run_retries`` in dagster.yaml, for a crashed or killed worker) is left to that retry;
otherwise the work the run did not finish, except what it reported as a permanent failure (bad
data, a failed gate), is requested again, up to ``max_attempts`` times, and then quarantined
with an error in the tick's log.
"""

from __future__ import annotations

import json
from collections import defaultdict

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from lora_assets.data.schemas import InvalidRecord, schema_for
from lora_assets.data.user_store import validate_user_id
from lora_assets.modes import MODES, modes_reading
from lora_assets.orchestration.batches import (
    ADAPTER_BATCH_JOB,
    DATASET_BATCH_JOB,
    adapter_batch_job,
    dataset_batch_job,
)
from lora_assets.orchestration.keys import BACKFILL_TAG, TRIGGER_TAG, USERS_TAG
from lora_assets.orchestration.reconcile import FailedBatch, failed_batches
from lora_assets.orchestration.registry import active_base_models, backfill_requests, forgotten_among
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.run_requests import (
    InFlight,
    PendingTraining,
    chunks,
    dataset_request,
    digest,
    in_flight,
    plan_backfill_page,
    run_config_of,
    trained_versions,
    training_slots,
)
from lora_assets.settings import Settings

SENSOR_INTERVAL_S = Settings.one_from_env("sensor_interval_s")


def _load(cursor: str | None) -> dict:
    return json.loads(cursor) if cursor else {}


# --- change feed -> dataset batch runs ---------------------------------------------------------


@sensor(
    name="change_feed_sensor",
    jobs=[dataset_batch_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Consumes the change feed: registers new users, coalesces events per user and source, "
        "and launches dataset batch runs (up to users_per_run users each) that re-materialize "
        "the changed sources and the datasets of exactly the modes that read them. Re-requests "
        "the users of dataset runs that failed or died."
    ),
)
def change_feed_sensor(context: SensorEvaluationContext, lora_home: LoraAssetsHome) -> SensorResult:
    settings = lora_home.settings()
    state = _load(context.cursor)
    feed = settings.feed()
    # Events up to the committed cursor had their runs created with it: the feed forgets them
    # now. What this tick reads is acknowledged by the next tick, after this one is committed.
    deliveries, state["feed"] = feed.consume(state.get("feed"), settings.feed_events_per_tick)
    store = settings.store()
    changed: dict[str, set[str]] = defaultdict(set)
    for delivery in deliveries:
        try:
            if delivery.error:
                raise ValueError(delivery.error)
            for event in delivery.events:
                validate_user_id(event.user)
                schema_for(event.source)
                if event.seq:
                    store.check_segment(event.user, event.source, event.seq)
        except (ValueError, OSError, InvalidRecord) as exc:
            feed.set_aside(delivery, str(exc))
            context.log.warning(f"change event {delivery.ref[:40]} set aside (dead letter): {exc}")
            continue
        for event in delivery.events:
            changed[event.user].add(event.source)
    forgotten = forgotten_among(context.instance, changed)
    if forgotten:  # erased users: whatever a producer still sent for them is erased, not learned
        for user in forgotten:
            del changed[user]
            for key in store.objects.list(user):
                store.objects.delete(key)
        context.log.warning(f"dropped the change events of {len(forgotten)} forgotten user(s) and erased what they carried")

    failed, state["failures"] = failed_batches(context.instance, DATASET_BATCH_JOB, state.get("failures"))
    retries: list[tuple[FailedBatch, dict[str, set[str]]]] = []
    gone = forgotten_among(context.instance, {c["user"] for b in failed for c in run_config_of(b.run, "rebuild_datasets")["users"]})
    for batch in failed:
        built = settings.state().built_in_run(batch.run.run_id)
        lost = {
            c["user"]: set(c["sources"]) for c in run_config_of(batch.run, "rebuild_datasets")["users"]
            if c["user"] not in batch.permanent and c["user"] not in gone
            and not all((c["user"], m.name) in built for m in modes_reading(set(c["sources"])))
        }
        if lost and batch.attempt >= settings.max_attempts:
            context.log.error(f"dataset run {batch.run.run_id} failed on attempt {batch.attempt}: "
                              f"giving up on {', '.join(sorted(lost))} (quarantined; see that run's logs)")
        elif lost:
            retries.append((batch, lost))

    cursor = json.dumps(state, sort_keys=True)
    if not changed and not retries:
        return SensorResult(skip_reason=SkipReason("no new change events"), cursor=cursor)

    new_users = settings.state().register(sorted(changed))  # one bounded query, however many users exist
    if new_users:
        context.log.info(f"registered {len(new_users)} new user(s)")
    tick = digest(state["feed"])
    requests = [
        dataset_request(users, changed, f"changes:{tick}:{i}", {TRIGGER_TAG: "change_feed"})
        for i, users in enumerate(chunks(sorted(changed), settings.users_per_run))
    ]
    for batch, lost in retries:
        requests.extend(
            dataset_request(users, lost, f"retry:{batch.run.run_id}:{i}", batch.retry_tags())
            for i, users in enumerate(chunks(sorted(lost), settings.users_per_run))
        )
    for request in requests:
        context.log.info(f"dataset run {request.run_key}: {request.tags[USERS_TAG]}")
    return SensorResult(run_requests=requests, cursor=cursor)


# --- changed datasets -> adapter batch runs ----------------------------------------------------


@sensor(
    name="adapter_retrain_sensor",
    jobs=[adapter_batch_job],
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Watches dataset materializations; when a user's dataset has a data version its adapters "
        "were not trained on, launches adapter batch runs (up to users_per_run users each, per "
        "active base model) that retrain exactly those adapters and publish the ones that pass "
        "the eval gate. Same content, no training. Also plans requested backfills and "
        "re-requests the adapters of training runs that failed or died."
    ),
)
def adapter_retrain_sensor(context: SensorEvaluationContext, lora_home: LoraAssetsHome) -> SensorResult:
    instance = context.instance
    settings = lora_home.settings()
    state = _load(context.cursor)
    flying = in_flight(instance)
    # While a training run waits in the queue, new dataset versions wait too (the cursor stays):
    # they join the next batch when that run starts, instead of queueing runs of a few users.
    after, latest, emptied = state.get("changes", 0), {}, {}
    if not flying.waiting:
        after, latest, emptied = _new_dataset_versions(settings, instance, after)
    state["changes"] = after
    state.pop("datasets", None)  # the cursor of the event-log era (README: Scale, migration)

    failed, state["failures"] = failed_batches(instance, ADAPTER_BATCH_JOB, state.get("failures"))
    gone = forgotten_among(
        instance, {u for u, _m in [*latest, *emptied]} | {i["user"] for b in failed for i in run_config_of(b.run, "train_adapters")["items"]}
    )
    pending = PendingTraining.empty()
    for base in active_base_models(instance):
        _untrained(settings, base, latest, gone, flying, pending, only_if_trained=False)
        # A dataset with nothing left to learn from: withdraw an adapter that was trained (no
        # adapter yet: nothing to do, as for a user with contacts but no messages).
        _untrained(settings, base, emptied, gone, flying, pending, only_if_trained=True)
    requests = pending.requests(settings, f"retrain:{digest(after)}", {TRIGGER_TAG: "dataset_changed"})
    requests += _retries(context, settings, failed, gone)
    # Backfills keep every training slot busy with one run waiting behind it, and no more: the
    # queue stays short, so a new change's run starts right after the ones running.
    room = 2 * training_slots(instance) - flying.runs - len(requests)
    requests += _backfill_pages(context, settings, state.setdefault("backfills", {}), room, flying)

    cursor = json.dumps(state, sort_keys=True)
    if not requests:
        reason = ("a training run is waiting in the queue; new dataset versions join the next batch"
                  if flying.waiting else "no new dataset versions to train")
        return SensorResult(skip_reason=SkipReason(reason), cursor=cursor)
    for request in requests:
        context.log.info(f"training run {request.run_key}: {request.tags['lora_assets/base_model']} "
                         f"{request.tags['lora_assets/modes']} for {request.tags[USERS_TAG]}")
    return SensorResult(run_requests=requests, cursor=cursor)


Versions = dict[tuple[str, str], str]  # (user, mode) -> dataset version


def _new_dataset_versions(settings: Settings, instance: DagsterInstance, after: int) -> tuple[int, Versions, Versions]:
    """The newest dataset version of each (user, mode) changed after the cursor ``after``, split
    into those with training examples and those left with none, and the new cursor.

    Stops at the first change whose dataset run is still going, so all the datasets that run
    rebuilds lead to one adapter run per batch rather than one per mode as they land."""
    latest: Versions = {}
    emptied: Versions = {}
    run_finished: dict[str, bool] = {}
    for change in settings.state().changes_after(after, settings.dataset_changes_per_tick):
        run_id = change["run_id"]
        if run_id not in run_finished:
            run = instance.get_run_by_id(run_id) if run_id else None
            run_finished[run_id] = run is None or run.is_finished
        if not run_finished[run_id]:
            break
        after = change["id"]
        if change["mode"] not in MODES:
            continue
        target = latest if change["train_rows"] else emptied
        (emptied if target is latest else latest).pop((change["user"], change["mode"]), None)
        target[(change["user"], change["mode"])] = change["version"]
    return after, latest, emptied


def _untrained(settings: Settings, base: str, versions: Versions, gone: set[str], flying: InFlight,
               pending: PendingTraining, only_if_trained: bool) -> None:
    """Add to ``pending`` each adapter on ``base`` not yet trained (nor being trained) on its
    dataset version; with ``only_if_trained``, only adapters that were trained before."""
    for mode in MODES:
        users = sorted(u for u, m in versions if m == mode and u not in gone)
        if not users:
            continue
        trained = trained_versions(settings, mode, base, users)
        for user in users:
            version = versions[(user, mode)]
            if only_if_trained and user not in trained:
                continue
            if trained.get(user) != version and (base, user, mode, version) not in flying.items:
                pending.add(base, user, mode, version)


def _retries(context: SensorEvaluationContext, settings: Settings, failed: list[FailedBatch], gone: set[str]) -> list:
    """Requests for what each failed training run did not finish, other than its permanent
    failures, what was trained since and forgotten users; past ``max_attempts``, an error."""
    requests = []
    for batch in failed:
        config = run_config_of(batch.run, "train_adapters")
        base = config["base_model"]
        lost = PendingTraining.empty()
        finished = settings.state().finished_in_run(batch.run.run_id)
        for item in config["items"]:
            if (f"{item['mode']}|{base}|{item['user']}" in batch.permanent
                    or (base, item["user"], item["mode"]) in finished or item["user"] in gone):
                continue
            lost.add(base, item["user"], item["mode"], item["dataset_version"])
        if not lost.items:
            continue
        names = sorted(f"{m}|{base}|{u}" for u, m in lost.items[base])
        if batch.attempt >= settings.max_attempts:
            context.log.error(f"training run {batch.run.run_id} failed on attempt {batch.attempt}: giving up on "
                              f"{', '.join(names)} (quarantined; see that run's logs)")
            continue
        requests.extend(lost.requests(settings, f"retry:{batch.run.run_id}", batch.retry_tags()))
    return requests


def _backfill_pages(context: SensorEvaluationContext, settings: Settings, backfills: dict, room: int,
                    flying: InFlight) -> list:
    """Requests for the next pages of the requested backfills, while ``room`` runs fit in the
    queue; ``backfills`` (the cursor's) records how far each one is planned."""
    requests = []
    for backfill_id, request in sorted(backfill_requests(context.instance).items()):
        if room <= 0:
            break
        if backfills.get(backfill_id) == "done":
            continue
        planned, backfills[backfill_id], skipped = plan_backfill_page(
            settings, request["base_model"], backfills.get(backfill_id), room * settings.users_per_run, flying.items
        )
        if skipped:
            context.log.info(f"backfill {backfill_id}: skipped (no training data) {skipped}")
        new = planned.requests(settings, f"backfill:{backfill_id}:{digest(backfills[backfill_id])}",
                               {TRIGGER_TAG: "backfill", BACKFILL_TAG: backfill_id, "dagster/priority": "-1"})
        requests.extend(new)
        room -= len(new)
    return requests
