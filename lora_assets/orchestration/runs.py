"""Runs launched from the CLI (the demo): the same batch jobs the sensors launch, in-process.

Runs launched here show up in the UI's run list like any other, under their job's name, with
their per-asset summary events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dagster import DagsterInstance, ExecuteInProcessResult

from lora_assets.data.user_store import validate_user_id
from lora_assets.orchestration.batches import adapter_batch_job, dataset_batch_job
from lora_assets.orchestration.keys import USERS_TAG
from lora_assets.orchestration.partitions import base_model_partitions
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.training.base_models import validate_base_model_key

# Progress lines (step, loss, tokens/s) are INFO; Dagster's per-step DEBUG events stay in the UI.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
CLI_TAGS = {"lora_assets/launched_by": "cli"}


def register_users(settings, users: Sequence[str]) -> list[str]:
    """Add users to the state table's registry; returns the ones that were new."""
    for user in users:
        validate_user_id(user)
    return settings.state().register(list(users))


def register_base_model_partition(instance: DagsterInstance, key: str) -> bool:
    validate_base_model_key(key)
    if instance.has_dynamic_partition(base_model_partitions.name, key):
        return False
    instance.add_dynamic_partitions(base_model_partitions.name, [key])
    return True


def run_dataset_batch(
    instance: DagsterInstance,
    changes: Mapping[str, Sequence[str]],
    resources: LoraAssetsHome,
    tags: Mapping[str, str] | None = None,
) -> ExecuteInProcessResult:
    """One ``dataset_batch`` run: each user's ``changes`` sources and the datasets that read them."""
    return dataset_batch_job.execute_in_process(
        run_config={**QUIET, "ops": {"rebuild_datasets": {"config": {
            "users": [{"user": u, "sources": sorted(s)} for u, s in changes.items()]
        }}}},
        instance=instance,
        resources={"lora_home": resources},
        tags={**CLI_TAGS, USERS_TAG: ",".join(changes), **(tags or {})},
        raise_on_error=False,
    )


def run_adapter_batch(
    instance: DagsterInstance, base_model: str, items: Sequence[tuple[str, str]], resources: LoraAssetsHome
) -> ExecuteInProcessResult:
    """One ``adapter_batch`` run training (user, mode) adapters on one base-model load and
    publishing those that pass the eval gate. A failed gate is an outcome, not a crash."""
    return adapter_batch_job.execute_in_process(
        run_config={**QUIET, "ops": {"train_adapters": {"config": {
            "base_model": base_model, "items": [{"user": u, "mode": m} for u, m in items]
        }}}},
        instance=instance,
        resources={"lora_home": resources},
        tags={**CLI_TAGS, "lora_assets/base_model": base_model,
              USERS_TAG: ",".join(sorted({u for u, _ in items}))},
        raise_on_error=False,
    )
