"""Every private Dagster name this project uses, in one place.

Dagster's public API has no run-status sets, no bulk event writes for batched materializations,
no tick records and no raw event-log and run tables (erasure scrubs them; the scale benchmark
copies rows into them). These live under ``dagster._*`` and may move in any release. Importing
them only from here means a Dagster upgrade breaks one module, loudly, at import time, and
``grep internals`` lists every place that depends on Dagster's internals. Tests import their
private test helpers from here too; those load on first use (``dagster._core.test_utils`` would
add a third of a second to every run worker's start).
The pins (``constraints.txt``: dagster 1.13.27) are what these paths were read against.
"""

from dagster._config import process_config
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationPlanned,
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.assets.job.asset_job import IMPLICIT_ASSET_JOB_NAME
from dagster._core.definitions.data_version import DATA_VERSION_IS_USER_PROVIDED_TAG, DATA_VERSION_TAG
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.events import AssetMaterializationPlannedData
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.scheduler.instigation import InstigatorType, TickStatus
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, NOT_FINISHED_STATUSES
from dagster._core.storage.event_log.base import PartitionKeyFilter
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import should_retry

__all__ = [
    "DATA_VERSION_IS_USER_PROVIDED_TAG",
    "DATA_VERSION_TAG",
    "FINISHED_STATUSES",
    "IMPLICIT_ASSET_JOB_NAME",
    "NOT_FINISHED_STATUSES",
    "AssetCheckEvaluationPlanned",
    "AssetCheckExecutionsTable",
    "AssetCheckEvaluationTargetMaterializationData",
    "AssetCheckExecutionRecordStatus",
    "AssetMaterializationPlannedData",
    "InstanceRef",
    "InstigatorType",
    "LoadableTargetOrigin",
    "PartitionKeyFilter",
    "RunTagsTable",
    "RunsTable",
    "SensorExecutionData",
    "SqlEventLogStorageTable",
    "TickStatus",
    "create_run_for_test",
    "dagster_instance_config",
    "in_process_test_workspace",
    "process_config",
    "should_retry",
]

_TEST_HELPERS = {"create_run_for_test", "in_process_test_workspace"}


def __getattr__(name: str):
    """The test-only helpers, imported when a test first asks for them."""
    if name in _TEST_HELPERS:
        from dagster._core import test_utils

        return getattr(test_utils, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
