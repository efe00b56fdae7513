"""lora_assets: one LoRA adapter per user per mode, kept fresh by Dagster."""

__version__ = "0.1.0"
