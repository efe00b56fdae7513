"""Partitions: adapters and their publication are partitioned by base model; users are not a
Dagster dimension.

Why not one partition per user: Dagster keeps per-partition caches (asset status, check
partition health, the partitions tab) that are rebuilt over every partition, and a dynamic
``users`` definition changes identity whenever a user registers. Measured at 1M users (README:
Scale) that made the asset page take minutes and a check's health hours. So a Dagster event
summarises a batch (counts and a digest of versions, no user id and no user text), and each
user's dataset, adapter, gate verdict and publication live in the project's own state table
(``lora_assets.state``), which ``lora-assets status`` reads. A base model is a partition because
it is what an operator backfills (a new base model trains every user's adapters).
"""

from __future__ import annotations

from dagster import DynamicPartitionsDefinition

base_model_partitions = DynamicPartitionsDefinition(name="base_models")
adapter_partitions = base_model_partitions

# Before the state table (migration): users were partitions, adapters base_model x user.
LEGACY_USERS_PARTITIONS = "users"


def legacy_adapter_partition(base_model: str, user: str) -> str:
    """The old adapter partition key, ``smollm2-135m|alice`` (dimensions joined in name order)."""
    return f"{base_model}|{user}"
