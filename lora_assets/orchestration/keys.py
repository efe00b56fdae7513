"""Asset keys and names shared by the asset bodies, the batch jobs and the sensors."""

from __future__ import annotations

from dagster import AssetKey

OWNERS = ["team:ml-platform"]
TRAINING_POOL = "training"
GATE_CHECK = "eval_gate"


def source_key(source: str) -> AssetKey:
    return AssetKey(["sources", source])


def dataset_key(mode: str) -> AssetKey:
    return AssetKey([mode, "dataset"])


def adapter_key(mode: str) -> AssetKey:
    return AssetKey([mode, "adapter"])


def published_key(mode: str) -> AssetKey:
    return AssetKey([mode, "published"])


def progress_logger(context, every: int = 10):
    """Training progress as log lines: every ``every`` steps and the last one, per job."""

    def progress(job: str, step: int, total: int, loss: float, tps: float) -> None:
        if step == total or step % every == 0:
            context.log.info(f"[{job}] step {step}/{total} loss {loss:.4f} {tps:.0f} tok/s")

    return progress
