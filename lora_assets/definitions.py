"""The Dagster code location: assembles assets, batch jobs, sensors and resources; holds no logic."""

from __future__ import annotations

import warnings

from dagster import BetaWarning, Definitions, in_process_executor

# backfill_policy is beta; we pin dagster exactly.
warnings.filterwarnings("ignore", category=BetaWarning)

from lora_assets.orchestration.assets import all_assets  # noqa: E402
from lora_assets.orchestration.batches import BATCH_JOBS  # noqa: E402
from lora_assets.orchestration.resources import LoraAssetsHome  # noqa: E402
from lora_assets.orchestration.sensors import adapter_retrain_sensor, change_feed_sensor  # noqa: E402

defs = Definitions(
    assets=all_assets(),
    jobs=BATCH_JOBS,
    sensors=[change_feed_sensor, adapter_retrain_sensor],
    resources={"lora_home": LoraAssetsHome()},
    # One process per run: every adapter op of a run shares one loaded base model, and a 2-core
    # box is not helped by a process per op.
    executor=in_process_executor,
)
