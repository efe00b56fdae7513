"""Asset keys, names and run tags shared by the asset bodies, the batch jobs and the sensors."""

from __future__ import annotations

from dagster import AssetKey

OWNERS = ["team:ml-platform"]
TRAINING_POOL = "training"
GATE_CHECK = "eval_gate"

# Run tags (the run list shows them; filters on them find a user's or a retry's runs).
TRIGGER_TAG = "lora_assets/trigger"  # dataset_changed, change_feed, backfill or retry
ATTEMPT_TAG = "lora_assets/attempt"  # 2 and up on a retry, whoever launched it
RETRY_OF_TAG = "lora_assets/retry_of"  # the failed run a retry redoes
RETRY_REASON_TAG = "lora_assets/retry_reason"  # why that run failed, in one line
USERS_TAG = "lora_assets/users"  # the users a batch run works for, comma-separated
TRAINING_TAG = "lora_assets/training"  # on every training batch run; the run queue limits it
BACKFILL_TAG = "lora_assets/backfill"  # the backfill a training run belongs to
MAX_RUNTIME_TAG = "dagster/max_runtime"  # read by the daemon's run monitoring
PERMANENT_FAILURES = "permanent_failures"  # a batch run's Failure metadata: work that must not be retried


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
