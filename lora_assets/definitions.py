"""The Dagster code location: assembles assets and resources; holds no logic of its own."""

from __future__ import annotations

import warnings

from dagster import BetaWarning, Definitions

# backfill_policy and MultiToSingleDimensionPartitionMapping are beta; we pin dagster exactly.
warnings.filterwarnings("ignore", category=BetaWarning)

from lora_assets.orchestration.assets import all_assets  # noqa: E402
from lora_assets.orchestration.resources import LoraAssetsHome  # noqa: E402

defs = Definitions(
    assets=all_assets(),
    resources={"lora_home": LoraAssetsHome()},
)
