"""The evaluation gate: publish an adapter only if it is better than the base model, and not
worse than what the user's devices already run. No dagster here; the asset check reports it.

The loss is the held-out response loss for SFT modes and the held-out DPO loss for DPO modes
(the base scores ln 2 there). Both comparisons use the *new* held-out set: the published adapter
is evaluated on it too, so a regression is measured on the same data, not on numbers from
different eval sets. The tolerance is relative (a fraction of the published adapter's loss), so
one setting fits base models whose losses differ by a factor of ten.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_assets.drive.publish import (
    FORMATS,
    CorruptVersion,
    adapter_prefix,
    current_manifest,
    fetch_verified,
    learned_deleted,
)
from lora_assets.storage import ObjectStore
from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.jobs import TrainJob, TrainResult
from lora_assets.training.objectives import training_for

GATE_FILE = "gate.json"


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    published_version: str | None
    published_eval_loss: float | None
    margin: float
    tolerance: float


def decide(
    base_loss: float | None,
    adapter_loss: float | None,
    published_loss: float | None,
    margin: float,
    tolerance: float,
) -> tuple[bool, str]:
    if base_loss is None or adapter_loss is None:
        return False, "no held-out examples to evaluate on"
    if adapter_loss > base_loss - margin:
        return False, f"adapter {adapter_loss:.4f} does not beat base {base_loss:.4f} by {margin}"
    if published_loss is not None and adapter_loss > published_loss * (1 + tolerance):
        return False, (f"adapter {adapter_loss:.4f} regresses against published {published_loss:.4f} "
                       f"by more than {tolerance:.1%}")
    return True, f"adapter {adapter_loss:.4f} < base {base_loss:.4f} - {margin}" + (
        f" and within {tolerance:.1%} of published {published_loss:.4f}" if published_loss is not None else ""
    )


def evaluate_gate(
    base: LoadedBaseModel,
    job: TrainJob,
    result: TrainResult,
    drive: ObjectStore,
    user: str,
    mode: str,
    margin: float,
    tolerance: float,
    live_examples: frozenset[str] | None = None,
) -> GateResult:
    """Compare the fresh adapter with the base and with the published CURRENT version.

    The published version is not compared when it is unreadable (a damaged upload) or was
    trained on examples no longer in ``live_examples`` (the dataset's training ids): a delete
    removes it anyway.
    """
    published, published_loss, unreadable = None, None, None
    try:
        published = current_manifest(drive, user, base.ref.key, mode)
        if published is not None and job.eval:
            files = fetch_verified(drive, adapter_prefix(user, base.ref.key, mode), published, FORMATS["peft"])
    except (CorruptVersion, FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        # A damaged published version is no bar to a good one: compare with the base only, and
        # publish over it.
        published, unreadable = None, f"{type(exc).__name__}: {exc}"
    stale = None
    if published is not None and job.eval and live_examples is not None:
        metadata = json.loads(files["lora_assets.json"])
        if learned_deleted(metadata, live_examples):
            # Trained on records the user deleted: it is removed whatever this gate says, so it
            # is no standard to hold the retrain without them to.
            gone = set(metadata["trained_examples"]) - live_examples
            published, stale = None, f"{len(gone)} of its training examples were deleted"
    if published is not None and job.eval:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            # The same measure training reported (held-out response loss, or DPO loss).
            published_loss = training_for(job.objective).evaluate_saved(base, Path(tmp), job)
    passed, reason = decide(result.base_eval_loss, result.adapter_eval_loss, published_loss, margin, tolerance)
    if unreadable:
        reason += f" (the published version is unreadable and was not compared: {unreadable[:200]})"
    if stale:
        reason += f" (the published version was not compared: {stale})"
    gate = GateResult(
        passed=passed,
        reason=reason,
        base_eval_loss=result.base_eval_loss,
        adapter_eval_loss=result.adapter_eval_loss,
        published_version=published["version"] if published else None,
        published_eval_loss=published_loss,
        margin=margin,
        tolerance=tolerance,
    )
    (Path(job.output_dir) / GATE_FILE).write_text(json.dumps(asdict(gate), indent=2))
    return gate


def read_gate(adapter_dir: Path) -> GateResult | None:
    path = Path(adapter_dir) / GATE_FILE
    return GateResult(**json.loads(path.read_text())) if path.exists() else None
