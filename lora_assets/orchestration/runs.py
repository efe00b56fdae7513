"""Launching runs from the CLI: in-process ``materialize`` against the real instance.

Runs launched here show up in the UI's run list like any other, with their asset events.
"""

from __future__ import annotations

from collections.abc import Sequence

from dagster import DagsterInstance, ExecuteInProcessResult, materialize

from lora_assets.data.user_store import validate_user_id
from lora_assets.modes import Mode
from lora_assets.orchestration.assets import (
    adapter_key,
    all_assets,
    dataset_key,
    published_key,
    source_key,
)
from lora_assets.orchestration.partitions import (
    adapter_partition_key,
    base_model_partitions,
    users_partitions,
)
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.training.base_models import validate_base_model_key

# Progress lines (step, loss, tokens/s) are INFO; Dagster's per-step DEBUG events stay in the UI.
QUIET = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def register_users(instance: DagsterInstance, users: Sequence[str]) -> list[str]:
    """Add users as ``users`` partitions; returns the ones that were new."""
    for user in users:
        validate_user_id(user)
    new = [u for u in users if not instance.has_dynamic_partition(users_partitions.name, u)]
    if new:
        instance.add_dynamic_partitions(users_partitions.name, new)
    return new


def register_base_model_partition(instance: DagsterInstance, key: str) -> bool:
    validate_base_model_key(key)
    if instance.has_dynamic_partition(base_model_partitions.name, key):
        return False
    instance.add_dynamic_partitions(base_model_partitions.name, [key])
    return True


def materialize_datasets(
    instance: DagsterInstance, user: str, modes: Sequence[Mode], resources: LoraAssetsHome
) -> ExecuteInProcessResult:
    """One run: the user's sources read by ``modes``, then those modes' datasets."""
    sources = sorted({s for m in modes for s in m.sources})
    keys = [source_key(s) for s in sources] + [dataset_key(m.name) for m in modes]
    return materialize(
        all_assets(),
        selection=keys,
        partition_key=user,
        instance=instance,
        resources={"lora_home": resources},
        tags={"lora_assets/launched_by": "cli"},
        run_config=QUIET,
    )


def materialize_adapters(
    instance: DagsterInstance,
    base_model: str,
    user: str,
    modes: Sequence[Mode],
    resources: LoraAssetsHome,
) -> ExecuteInProcessResult:
    """One run training the user's adapters of ``modes`` (base model loaded once) and publishing
    those that pass the eval gate to the user's drive."""
    return materialize(
        all_assets(),
        selection=[k for m in modes for k in (adapter_key(m.name), published_key(m.name))],
        partition_key=str(adapter_partition_key(base_model, user)),
        instance=instance,
        resources={"lora_home": resources},
        tags={"lora_assets/launched_by": "cli"},
        run_config=QUIET,
        raise_on_error=False,  # a failed eval gate is an outcome to report, not a crash
    )


def launch_adapter_backfill(instance: DagsterInstance, base_model: str) -> str:
    """A real Dagster backfill (on the UI's backfills page) of every user's adapters for one base.

    The daemon's backfill loop runs it; ``BackfillPolicy.multi_run`` on the adapter assets packs
    several users into each run so the base model loads once per run.
    """
    from dagster._core.execution.backfill import PartitionBackfill
    from dagster._core.utils import make_new_backfill_id
    from dagster._time import get_current_timestamp

    from lora_assets.definitions import defs
    from lora_assets.modes import MODES
    from lora_assets.orchestration.sensors import retired_base_models

    if not instance.has_dynamic_partition(base_model_partitions.name, base_model):
        raise ValueError(f"base model {base_model!r} is not registered: run `lora-assets base-model add {base_model}`")
    if base_model in retired_base_models(instance):
        raise ValueError(f"base model {base_model!r} is retired: `lora-assets base-model add {base_model}` reactivates it")
    users = instance.get_dynamic_partitions(users_partitions.name)
    if not users:
        raise ValueError("no users registered yet: ingest some data first")
    backfill_id = make_new_backfill_id()
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id=backfill_id,
        asset_graph=defs.resolve_asset_graph(),
        partition_names=[str(adapter_partition_key(base_model, u)) for u in users],
        asset_selection=[k for m in MODES for k in (adapter_key(m), published_key(m))],
        backfill_timestamp=get_current_timestamp(),
        tags={"lora_assets/trigger": "new_base_model", "lora_assets/base_model": base_model},
        dynamic_partitions_store=instance,
        all_partitions=False,
        title=f"Adapters on {base_model}",
        description=f"Train every user's adapters ({len(users)} users x {len(MODES)} modes) on {base_model}.",
        run_config=None,
    )
    instance.add_backfill(backfill)
    return backfill_id
