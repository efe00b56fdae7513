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
    """Training progress as log lines, every ``every`` steps of a job but the last: the outcome
    line that follows says how it ended (each log line is an event-log row, README: Scale)."""

    def progress(job: str, step: int, total: int, loss: float, tps: float) -> None:
        if step % every == 0 and step != total:
            context.log.info(f"[{job}] step {step}/{total} loss {loss:.4f} {tps:.0f} tok/s")

    return progress
