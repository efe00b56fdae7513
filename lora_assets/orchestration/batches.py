"""Batch runs: many users' datasets, or many users' adapters, in one run.

The sensors and ``lora-assets backfill`` launch these instead of one run per user: a run pays a
process start, a code-location load, a torch import and a base-model load, which cost far more
than training one small adapter. Each run lists exactly the (user, mode)s that changed, never a
range of users, and records per partition the events a one-partition asset run records
(``recording.py``), so the UI's partition view, check history and the sensors see no difference.

Failure isolation: a user whose data is bad, or whose adapter fails the gate, is recorded as
failed on its own partitions; the others are trained, published and recorded as usual. The run
then fails, listing the failed partitions in the failure's metadata, which is how the sensors
tell a failure that will not go away (bad data, a failed gate) from lost work (a killed or
crashed run) that must be requested again.
"""


import json
import shutil

from dagster import (
    Config,
    Failure,
    JobDefinition,
    OpExecutionContext,
    job,
    op,
)

from lora_assets.data.schemas import InvalidRecord
from lora_assets.datasets import refresh_dataset
from lora_assets.modes import get_mode, modes_reading
from lora_assets.orchestration import metadata as md
from lora_assets.orchestration import recording
from lora_assets.orchestration.assets import (
    GATE_CHECK,
    TRAINING_POOL,
    adapter_key,
    dataset_key,
    outcome_meta,
    progress_logger,
    publish_and_record,
    published_key,
    source_key,
    source_metadata,
)
from lora_assets.orchestration.base_cache import loaded_base_model, use_run_threads
from lora_assets.orchestration.partitions import adapter_partition_key, adapter_partitions
from lora_assets.orchestration.registry import forgotten_among, is_forgotten
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.pipeline import AdapterOutcome, AdapterWork, source_state, train_and_gate, withdraw

DATASET_BATCH_JOB = "dataset_batch"
ADAPTER_BATCH_JOB = "adapter_batch"
USERS_TAG = "lora_assets/users"  # the users a batch run works for, comma-separated
TRAINING_TAG = "lora_assets/training"  # on every training batch run; the run queue limits it
# On Kubernetes (K8sRunLauncher) a training run's pod asks for a GPU node; other launchers ignore
# the tag. Label GPU nodes `lora-assets/pool=gpu` (README: Deploy at scale).
K8S_CONFIG_TAG = "dagster-k8s/config"
TRAINING_POD = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1, "memory": "30Gi"}}},
    "pod_spec_config": {
        "node_selector": {"lora-assets/pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}
# On ECS (EcsRunLauncher) this tag is merged last into the run's RunTask call, so each job picks
# its run worker: dataset runs are CPU work on Fargate, training needs the GPU worker; other
# launchers ignore it. Runs without it get the launcher's default, the GPU worker (dagster.yaml).
ECS_RUN_TASK_TAG = "ecs/run_task_kwargs"
CPU_RUN_TASK = json.dumps({"taskDefinition": "lora-assets-run-cpu",
                           "capacityProviderStrategy": [{"capacityProvider": "FARGATE", "weight": 1}]})
GPU_RUN_TASK = json.dumps({"taskDefinition": "lora-assets-run"})
PERMANENT_FAILURES = "permanent_failures"  # Failure metadata: work that must not be retried


class UserChanges(Config):
    user: str
    sources: list[str]  # the sources that changed; their modes' datasets are rebuilt


class DatasetBatch(Config):
    users: list[UserChanges]


class AdapterItem(Config):
    user: str
    mode: str
    dataset_version: str = ""  # the version the sensor saw (the run trains whatever is current)


class AdapterBatch(Config):
    base_model: str
    items: list[AdapterItem]


def batch_users(run) -> set[str] | None:
    """The users a ``dataset_batch`` or ``adapter_batch`` run lists in its config; None for any
    other run. The config is the full list (the users tag is cut short for display)."""
    if run.job_name not in (DATASET_BATCH_JOB, ADAPTER_BATCH_JOB):
        return None
    ops = run.run_config.get("ops", {})
    config = ops.get("rebuild_datasets", ops.get("train_adapters", {})).get("config", {})
    return {entry.get("user") for entry in config.get("users", config.get("items", []))}


@op(
    name="rebuild_datasets",
    description="Re-materializes the changed sources of every listed user and the datasets of the modes that read them.",
)
def rebuild_datasets(context: OpExecutionContext, config: DatasetBatch, lora_home: LoraAssetsHome) -> None:
    settings = lora_home.settings()
    store, datasets = settings.store(), settings.datasets()
    gone = forgotten_among(context.instance, [c.user for c in config.users])
    plans = {c.user: (sorted(set(c.sources)), modes_reading(set(c.sources))) for c in config.users if c.user not in gone}
    recording.plan(
        context,
        [(source_key(s), u) for u, (sources, _) in plans.items() for s in sources]
        + [(dataset_key(m.name), u) for u, (_, modes) in plans.items() for m in modes],
    )
    failed: dict[str, str] = {}
    permanent: list[str] = []

    def fail(user: str, exc: Exception) -> None:
        failed[user] = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, InvalidRecord):
            permanent.append(user)  # the data itself: the same build would fail again
        context.log.error(f"{user}: datasets not rebuilt: {failed[user]}")

    for user, (sources, _modes) in plans.items():
        try:
            for source in sources:
                state = source_state(store, user, source)
                recording.materialize(context, source_key(source), user, state.fingerprint, source_metadata(state))
        except Exception as exc:  # storage errors and the like: lost work, requested again
            fail(user, exc)
    users = [u for u in plans if u not in failed]
    needed = sorted({s for u in users for m in plans[u][1] for s in m.sources})
    upstream = {s: recording.latest_materializations(context.instance, source_key(s), users) for s in needed}
    for user in users:
        if is_forgotten(context.instance, user):  # forgotten while this run was going: write nothing more
            continue
        built = []
        try:
            for mode in plans[user][1]:
                refreshed = refresh_dataset(store, datasets, mode, user)
                recording.materialize(
                    context, dataset_key(mode.name), user, refreshed.version, md.dataset_metadata(refreshed),
                    upstream=[(source_key(s), upstream[s].get(user)) for s in mode.sources],
                )
                built.append(f"{mode.name} {refreshed.report.how} ({refreshed.report.changed_records} records) "
                             f"{len(refreshed.df)} rows")
                if warning := md.skipped_warning(mode.name, user, refreshed):
                    context.log.warning(warning)
        except Exception as exc:
            fail(user, exc)
            continue
        context.log.info(f"{user}: " + "; ".join(built))
    if failed:
        raise Failure(
            description=f"datasets not rebuilt for {len(failed)} of {len(plans)} users: "
            + "; ".join(f"{u}: {e}" for u, e in sorted(failed.items())),
            metadata={PERMANENT_FAILURES: json.dumps(sorted(permanent))},
        )


@op(
    name="train_adapters",
    pool=TRAINING_POOL,
    description=(
        "Trains the listed users' adapters of one base model (loaded once, fused where possible), "
        "gates each, and publishes those that pass."
    ),
)
def train_adapter_batch(context: OpExecutionContext, config: AdapterBatch, lora_home: LoraAssetsHome) -> None:
    settings = lora_home.settings()
    threads = use_run_threads(settings)
    base_model = config.base_model
    gone = forgotten_among(context.instance, [i.user for i in config.items])
    works = [AdapterWork(base_model, i.user, get_mode(i.mode).name) for i in config.items if i.user not in gone]
    partition = {w: str(adapter_partition_key(base_model, w.user)) for w in works}
    datasets = {
        mode: recording.latest_materializations(context.instance, dataset_key(mode), [w.user for w in works if w.mode == mode])
        for mode in sorted({w.mode for w in works})
    }
    done = already_published(context.instance, works, partition, datasets)
    if done:  # a retry of a run that died half way: what it finished stays finished
        context.log.info(f"already trained on the current dataset and published: {', '.join(sorted(w.name for w in done))}")
        works = [w for w in works if w not in done]
    recording.plan(
        context,
        [(k(w.mode), partition[w]) for w in works for k in (adapter_key, published_key)],
        [(adapter_key(w.mode), GATE_CHECK, partition[w], adapter_partitions) for w in works],
    )
    permanent, lost = [], []

    def record(outcome: AdapterOutcome) -> None:
        """Record one adapter's events, and publish it, as soon as its gate is known."""
        w, key = outcome.work, partition[outcome.work]
        label = f"{w.mode}|{key}"
        if is_forgotten(context.instance, w.user):  # forgotten while training: keep nothing of it
            shutil.rmtree(outcome.folder, ignore_errors=True)
            return
        if outcome.error:
            permanent.append(label)
            context.log.error(f"[{w.name}] not trained: {outcome.error}")
            return
        if outcome.withdraw:
            withdrawn = withdraw(settings, w, outcome.withdraw)
            for key_fn, meta in ((adapter_key, {"withdrawn": True, "reason": outcome.withdraw,
                                                "dataset_version": outcome.dataset_version}),
                                 (published_key, {"version": "withdrawn", "reason": outcome.withdraw,
                                                  "deleted_versions": ", ".join(withdrawn.deleted_versions)})):
                recording.materialize(context, key_fn(w.mode), key, f"withdrawn:{outcome.dataset_version}", meta)
            context.log.info(f"[{w.name}] withdrawn: {outcome.withdraw}; devices remove it at their next sync")
            return
        plain = outcome_meta(outcome)
        recording.materialize(
            context, adapter_key(w.mode), key, plain["sha256"], md.adapter_metadata(plain),
            upstream=[(dataset_key(w.mode), datasets[w.mode].get(w.user))],
        )
        adapter = recording.latest_materialization(context.instance, adapter_key(w.mode), key)
        recording.check(context, adapter_key(w.mode), GATE_CHECK, key, outcome.gate.passed,
                        md.gate_metadata(outcome.gate), adapter)
        summary = f"[{w.name}] {plain['steps']} steps, eval loss {plain['base_eval_loss']} -> {plain['adapter_eval_loss']}"
        if not outcome.gate.passed:
            permanent.append(label)
            context.log.warning(f"{summary}; eval gate failed: {outcome.gate.reason}")
            return
        context.log.info(summary)
        try:
            publish_and_record(context, settings, w, adapter)
        except Exception as exc:  # the drive is unreachable: lost work, requested again
            lost.append(label)
            context.log.error(f"[{w.name}] not published ({type(exc).__name__}): {exc}")

    base = loaded_base_model(base_model, settings)
    from lora_assets.training.variant import resolve_fusion

    context.log.info(f"{len(works)} adapters of {len({w.user for w in works})} users on {base_model}, "
                     f"{base.device.type} {str(base.dtype).removeprefix('torch.')}, "
                     f"{resolve_fusion(settings.fusion, base.device)} training (groups of at most {settings.fuse}), "
                     f"{threads} torch threads")
    train_and_gate(settings, base, works, progress=progress_logger(context), on_outcome=record)
    if permanent or lost:
        raise Failure(
            description=f"{len(permanent) + len(lost)} of {len(works)} adapters not published: "
            + ", ".join(sorted(permanent + lost)),
            metadata={PERMANENT_FAILURES: json.dumps(sorted(permanent))},
        )


def already_published(instance, works: list[AdapterWork], partition: dict, datasets: dict) -> set[AdapterWork]:
    """Works whose latest adapter was trained on the current dataset version and published since."""
    done = set()
    for mode in sorted({w.mode for w in works}):
        keys = [partition[w] for w in works if w.mode == mode]
        adapters = recording.latest_materializations(instance, adapter_key(mode), keys)
        published = recording.latest_materializations(instance, published_key(mode), keys)
        for w in (w for w in works if w.mode == mode):
            adapter, dataset = adapters.get(partition[w]), datasets[mode].get(w.user)
            pub = published.get(partition[w])
            if adapter is None or dataset is None or pub is None or pub.storage_id < adapter.storage_id:
                continue
            trained_on = adapter.asset_materialization.metadata.get("dataset_version")
            if trained_on is not None and trained_on.value == dataset.asset_materialization.tags.get("dagster/data_version"):
                done.add(w)
    return done


@job(
    name=DATASET_BATCH_JOB,
    description="Rebuilds the changed sources and datasets of a batch of users (launched by change_feed_sensor).",
    tags={"lora_assets/kind": "datasets", ECS_RUN_TASK_TAG: CPU_RUN_TASK},
)
def dataset_batch_job() -> None:
    rebuild_datasets()


@job(
    name=ADAPTER_BATCH_JOB,
    description="Trains, gates and publishes a batch of users' adapters on one base model "
    "(launched by adapter_retrain_sensor and lora-assets backfill).",
    tags={"lora_assets/kind": "adapters", TRAINING_TAG: "true", K8S_CONFIG_TAG: TRAINING_POD,
          ECS_RUN_TASK_TAG: GPU_RUN_TASK},
)
def adapter_batch_job() -> None:
    train_adapter_batch()


BATCH_JOBS: list[JobDefinition] = [dataset_batch_job, adapter_batch_job]
