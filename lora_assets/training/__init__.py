"""Training core: base models, LoRA SFT and DPO (fused across users where possible), inference.

Imports no dagster.
"""

from lora_assets.training.base_models import (
    DEFAULT_BASE_MODEL,
    TINY_BASE_MODEL,
    BaseModelError,
    BaseModelRef,
    LoadedBaseModel,
    load_base_model,
    register_base_model,
    resolve_base_model,
)
from lora_assets.training.core import (
    Example,
    InvalidTrainingData,
    TrainJob,
    TrainResult,
    read_adapter_metadata,
    train_adapters,
    validate_job,
)
from lora_assets.training.dpo import PreferencePair

__all__ = [
    "DEFAULT_BASE_MODEL",
    "TINY_BASE_MODEL",
    "BaseModelError",
    "BaseModelRef",
    "Example",
    "InvalidTrainingData",
    "LoadedBaseModel",
    "PreferencePair",
    "TrainJob",
    "TrainResult",
    "load_base_model",
    "read_adapter_metadata",
    "register_base_model",
    "resolve_base_model",
    "train_adapters",
    "validate_job",
]
