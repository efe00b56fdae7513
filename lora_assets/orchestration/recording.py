"""Per-partition asset events from a batch run, recorded as a one-partition asset run records them.

Dagster runs carry one partition or one contiguous range (dagster-io/dagster#32335), so a run
that rebuilds or retrains an arbitrary set of users is an op job. For the UI, the sensors and
``fetch_materializations`` to see each partition exactly as after a one-partition asset run,
the batch op records, per partition, what Dagster's asset execution would have:

- an ``ASSET_MATERIALIZATION_PLANNED`` (and ``ASSET_CHECK_EVALUATION_PLANNED``) event when the
  run starts, so the partition shows as in progress, and as failed if the run then fails
  without materializing it;
- the materialization with its metadata and the data-version tags: its data version, the code
  version (the run id, as for assets without one) and, per upstream asset, the input data
  version and event pointer, so staleness in the UI works as for any asset;
- the check evaluation, linked to the materialization it judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    AssetRecordsFilter,
    DagsterInstance,
    OpExecutionContext,
)
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned,
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.definitions.partitions.definition import PartitionsDefinition
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventType,
)


def plan(
    context: OpExecutionContext,
    assets: Sequence[tuple[AssetKey, str]],
    checks: Sequence[tuple[AssetKey, str, str, PartitionsDefinition]] = (),
) -> None:
    """Announce the (asset, partition)s and (asset, check, partition)s this run will produce."""
    instance, run_id, job = context.instance, context.run.run_id, context.job_name
    for key, partition in assets:
        instance.report_dagster_event(
            DagsterEvent.build_asset_materialization_planned_event(
                job, context.op_handle.name, AssetMaterializationPlannedData(key, partition=partition)
            ),
            run_id,
        )
    for key, check, partition, partitions_def in checks:
        instance.report_dagster_event(
            DagsterEvent(
                event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED.value,
                job_name=job,
                message=f"{job} intends to execute asset check {check} on asset {key.to_string()} [{partition}]",
                event_specific_data=AssetCheckEvaluationPlanned(
                    asset_key=key,
                    check_name=check,
                    partitions_subset=partitions_def.empty_subset().with_partition_keys([partition]),
                ),
            ),
            run_id,
        )


def latest_materialization(instance: DagsterInstance, key: AssetKey, partition: str):
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
    ).records
    return records[0] if records else None


def latest_materializations(instance: DagsterInstance, key: AssetKey, partitions: Sequence[str]) -> dict[str, Any]:
    """Partition -> its latest materialization record, for many partitions in two indexed queries."""
    ids = instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION, set(partitions))
    if not ids:
        return {}
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    return {r.partition_key: r for r in records}


def materialize(
    context: OpExecutionContext,
    key: AssetKey,
    partition: str,
    data_version: str,
    metadata: Mapping[str, Any],
    upstream: Sequence[tuple[AssetKey, Any]] = (),
) -> None:
    """Record a partition's materialization with the data-version tags asset execution adds.

    ``upstream``: (asset key, its latest materialization record or None) per input partition;
    callers fetch them in bulk with ``latest_materializations``.
    """
    provenance: dict[str, str] = {
        DATA_VERSION_TAG: data_version,
        DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
        CODE_VERSION_TAG: context.run.run_id,
    }
    for input_key, record in upstream:
        if record is not None:
            upstream = record.asset_materialization.tags.get(DATA_VERSION_TAG)
            if upstream:
                provenance[get_input_data_version_tag(input_key)] = upstream
                provenance[get_input_event_pointer_tag(input_key)] = str(record.storage_id)
    context.log_event(
        AssetMaterialization(key, partition=partition, metadata=dict(metadata), tags=provenance)
    )


def check(
    context: OpExecutionContext,
    key: AssetKey,
    check_name: str,
    partition: str,
    passed: bool,
    metadata: Mapping[str, Any],
    target_record: Any,
    description: str | None = None,
) -> None:
    """Record a blocking check's verdict on a partition, linked to the materialization it judged."""
    record = target_record
    target = (
        AssetCheckEvaluationTargetMaterializationData(
            storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp
        )
        if record is not None
        else None
    )
    context.log_event(
        AssetCheckEvaluation(
            asset_key=key,
            check_name=check_name,
            passed=passed,
            metadata=dict(metadata),
            partition=partition,
            blocking=True,
            description=description,
            target_materialization_data=target,
        )
    )
