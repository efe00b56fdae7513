"""Evaluate one sensor tick the way the daemon does, in this process.

Used by the sensor tests, the scale-out tests and ``benchmarks/scale.py``; also handy
for debugging a sensor against a real instance without running the daemon.
"""

from dagster import (
    DagsterInstance,
    Definitions,
    SensorDefinition,
    build_sensor_context,
    partition_loading_context,
)

from lora_assets.orchestration.internals import SensorExecutionData
from lora_assets.orchestration.resources import LoraAssetsHome


def evaluate_tick(
    sensor: SensorDefinition,
    instance: DagsterInstance,
    lora_home: LoraAssetsHome,
    cursor: str | None,
    defs: Definitions,
) -> SensorExecutionData:
    """One tick through ``evaluate_tick`` (target and partition-key checks included)."""
    ctx = build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        cursor=cursor,
        resources={"lora_home": lora_home},
        definitions=defs,
    )
    with partition_loading_context(dynamic_partitions_store=instance):
        return sensor.evaluate_tick(ctx)
