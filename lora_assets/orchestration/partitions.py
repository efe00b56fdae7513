"""Partitions: users and base models are dynamic; adapters are base_model x user.

A mode cannot be a third dimension (Dagster allows two), so modes are asset factories instead.
Multi-partition keys join dimensions in name order: ``smollm2-135m|alice``.
"""

from __future__ import annotations

from dagster import (
    DynamicPartitionsDefinition,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

users_partitions = DynamicPartitionsDefinition(name="users")
base_model_partitions = DynamicPartitionsDefinition(name="base_models")
adapter_partitions = MultiPartitionsDefinition(
    {"base_model": base_model_partitions, "user": users_partitions}
)


def adapter_partition_key(base_model: str, user: str) -> MultiPartitionKey:
    return MultiPartitionKey({"base_model": base_model, "user": user})


def split_adapter_key(key: str) -> tuple[str, str]:
    """``"smollm2-135m|alice"`` -> ``("smollm2-135m", "alice")``."""
    keys = adapter_partitions.get_partition_key_from_str(key).keys_by_dimension
    return keys["base_model"], keys["user"]
