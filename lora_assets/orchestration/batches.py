"""Batch runs: many users' datasets, or many users' adapters, in one run.

The sensors and ``lora-assets backfill`` launch these instead of one run per user: a run pays a
process start, a code-location load, a torch import and a base-model load, which cost far more
than training one small adapter. Each run lists exactly the (user, mode)s that changed, never a
range of users; each user's outcome goes to the state table and the run records one summary
event per asset (``recording.py``), as an asset run launched from the UI does.

Failure isolation: a user whose data is bad, or whose adapter fails the gate, is recorded as
failed in their own state rows; the others are trained, published and recorded as usual. The run
then fails, listing the failed partitions in the failure's metadata, which is how the sensors
tell a failure that will not go away (bad data, a failed gate) from lost work (a killed or
crashed run) that must be requested again.
"""


import json

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
from lora_assets.orchestration import recording
from lora_assets.orchestration.base_cache import loaded_base_model, use_run_threads
from lora_assets.orchestration.keys import (
    GATE_CHECK,
    PERMANENT_FAILURES,
    TRAINING_POOL,
    TRAINING_TAG,
    adapter_key,
    dataset_key,
    progress_logger,
    published_key,
    source_key,
)
from lora_assets.orchestration.partitions import adapter_partitions
from lora_assets.orchestration.reconcile import label_retry
from lora_assets.orchestration.registry import forgotten_among, is_forgotten
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.pipeline import AdapterOutcome, AdapterWork, publish, source_state, train_and_gate

DATASET_BATCH_JOB = "dataset_batch"
ADAPTER_BATCH_JOB = "adapter_batch"
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
    label_retry(context)
    settings = lora_home.settings()
    store, datasets = settings.store(), settings.datasets()
    gone = forgotten_among(context.instance, [c.user for c in config.users])
    plans = {c.user: (sorted(set(c.sources)), modes_reading(set(c.sources))) for c in config.users if c.user not in gone}
    recording.plan(context, [(source_key(s), None) for _u, (sources, _) in plans.items() for s in sources]
                   + [(dataset_key(m.name), None) for _u, (_, modes) in plans.items() for m in modes])
    summary = recording.Summary()
    failed: dict[str, str] = {}
    permanent: list[str] = []

    def fail(user: str, exc: Exception) -> None:
        failed[user] = str(exc) if isinstance(exc, InvalidRecord) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, InvalidRecord):
            permanent.append(user)  # the data itself: the same build would fail again
        for mode in plans[user][1]:
            summary.add(dataset_key(mode.name), None, "failed")
        context.log.error(f"{user}: datasets not rebuilt: {failed[user]}")

    try:
        for user, (sources, modes) in plans.items():
            if is_forgotten(context.instance, user):  # forgotten while this run was going: write nothing more
                continue
            built = []
            try:
                for source in sources:
                    state = source_state(store, user, source)
                    summary.add(source_key(source), None, "read", state.fingerprint, records=state.records)
                for mode in modes:
                    refreshed = refresh_dataset(store, datasets, mode, user)
                    recording.record_dataset(context, settings, summary, dataset_key(mode.name), mode.name, user, refreshed)
                    built.append(f"{mode.name} {refreshed.report.how} ({refreshed.report.changed_records} records) "
                                 f"{len(refreshed.df)} rows")
            except Exception as exc:  # storage errors: lost work, requested again; bad data: permanent
                fail(user, exc)
                continue
            context.log.info(f"{user}: " + "; ".join(built))
    finally:  # also when the run is stopped half way: what was built is counted
        summary.flush(context)
    if failed:
        raise Failure(
            description=f"datasets not rebuilt for {len(failed)} of {len(plans)} users: "
            + "; ".join(f"{u}: {e}" for u, e in sorted(failed.items())),
            metadata={PERMANENT_FAILURES: json.dumps(sorted(permanent))},
        )


def train_and_record(context, settings, base_model: str, works: list[AdapterWork], summary: recording.Summary,
                     publish_here: bool = True) -> tuple[list[str], list[str]]:
    """Train, gate, record and (``publish_here``) publish ``works`` on one loaded base model;
    returns the labels of permanent failures (bad data, a failed gate) and of lost work (the
    drive was unreachable)."""
    from lora_assets.training.variant import resolve_fusion

    threads = use_run_threads(settings)
    permanent, lost = [], []

    def record(outcome: AdapterOutcome) -> None:
        w = outcome.work
        what = recording.record_outcome(context, settings, summary, outcome,
                                        (lambda work: publish(settings, work)) if publish_here else None)
        label = f"{w.mode}|{w.base_model}|{w.user}"
        if what in ("not_trained", "gate_failed"):
            permanent.append(label)
        elif what in ("publish_failed", "lost"):
            lost.append(label)

    base = loaded_base_model(base_model, settings)
    context.log.info(f"{len(works)} adapters of {len({w.user for w in works})} users on {base_model}, "
                     f"{base.device.type} {str(base.dtype).removeprefix('torch.')}, "
                     f"{resolve_fusion(settings.fusion, base.device)} training (groups of at most {settings.fuse}), "
                     f"{threads} torch threads")
    train_and_gate(settings, base, works, progress=progress_logger(context), on_outcome=record)
    return permanent, lost


@op(
    name="train_adapters",
    pool=TRAINING_POOL,
    description=(
        "Trains the listed users' adapters of one base model (loaded once, fused where possible), "
        "gates each, and publishes those that pass."
    ),
)
def train_adapter_batch(context: OpExecutionContext, config: AdapterBatch, lora_home: LoraAssetsHome) -> None:
    label_retry(context)
    settings = lora_home.settings()
    base_model = config.base_model
    gone = forgotten_among(context.instance, [i.user for i in config.items])
    works = [AdapterWork(base_model, i.user, get_mode(i.mode).name) for i in config.items if i.user not in gone]
    done = already_published(settings, works)
    if done:  # a retry of a run that died half way: what it finished stays finished
        context.log.info(f"already trained on the current dataset and published: {', '.join(sorted(w.name for w in done))}")
        works = [w for w in works if w not in done]
    modes = sorted({w.mode for w in works})
    recording.plan(context, [(k(m), base_model) for m in modes for k in (adapter_key, published_key)],
                   [(adapter_key(m), GATE_CHECK, base_model, adapter_partitions) for m in modes])
    summary = recording.Summary()
    for mode in modes:
        summary.expect(adapter_key(mode), base_model, sum(w.mode == mode for w in works))
    try:
        permanent, lost = train_and_record(context, settings, base_model, works, summary)
    finally:  # also when training fails half way: what finished is counted
        summary.flush(context)
        for mode in modes:
            judged = recording.latest_materialization(context.instance, adapter_key(mode), base_model)
            judged = judged if judged is not None and judged.run_id == context.run.run_id else None
            context.log_event(recording.gate_evaluation(summary, adapter_key(mode), GATE_CHECK, base_model, judged))
    if permanent or lost:
        raise Failure(
            description=f"{len(permanent) + len(lost)} of {len(works)} adapters not published: "
            + ", ".join(sorted(permanent + lost)),
            metadata={PERMANENT_FAILURES: json.dumps(sorted(permanent))},
        )


def already_published(settings, works: list[AdapterWork]) -> set[AdapterWork]:
    """Works whose adapter was trained on the current dataset version and published since."""
    state, done = settings.state(), set()
    for mode in sorted({w.mode for w in works}):
        for base in sorted({w.base_model for w in works if w.mode == mode}):
            mine = [w for w in works if w.mode == mode and w.base_model == base]
            rows = state.rows(mode, base, [w.user for w in mine])
            done.update(w for w in mine if rows.get(w.user, {}).get("reason") == "fresh")
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
