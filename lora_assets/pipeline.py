"""The work behind every partition, the same on every path that launches it. No dagster here.

A partition is computed by the same functions whether a one-partition asset run (UI, Dagster
backfill) or a batch run of many users (sensors, ``lora-assets backfill``) asks for it:

- ``source_state``: a user's records of one source, fingerprinted (the source's data version);
- ``refresh_dataset`` (``lora_assets.datasets``): a mode's dataset, rebuilt incrementally;
- ``train_and_gate``: adapters for many (base model, user, mode), trained on one loaded base
  (fused where possible) and each put through the eval gate;
- ``publish``: a passed adapter to the user's drive.

Each returns plain values; the Dagster layer turns them into materializations and check
evaluations. Torch is imported only by the functions that train.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_assets.data.user_store import UserStore, table_fingerprint
from lora_assets.modes import get_mode
from lora_assets.paths import unfinished_writes
from lora_assets.settings import Settings

if TYPE_CHECKING:
    from lora_assets.drive.publish import PublishResult
    from lora_assets.gate import GateResult
    from lora_assets.training import LoadedBaseModel, TrainJob, TrainResult


@dataclass(frozen=True)
class SourceState:
    records: int
    log_head: int  # sequence number of the newest store segment
    fingerprint: str  # content hash of the current records: the source's data version


def source_state(store: UserStore, user: str, source: str) -> SourceState:
    """A source's records as a dataset run reads them; a delete since the last snapshot is
    compacted away first, so the deleted text leaves the store in the run that learns of it."""
    store.compact_deleted(user, source)
    table, head = store.read_at_head(user, source)
    return SourceState(table.num_rows, head, table_fingerprint(table))


@dataclass(frozen=True)
class AdapterWork:
    """One adapter to (re)train: a partition of ``<mode>/adapter``."""

    base_model: str
    user: str
    mode: str

    @property
    def name(self) -> str:
        return f"{self.base_model}|{self.user}/{self.mode}"


@dataclass
class AdapterOutcome:
    work: AdapterWork
    folder: Path  # the working copy: trained adapter + gate verdict
    dataset_version: str | None = None
    result: TrainResult | None = None
    gate: GateResult | None = None
    error: str | None = None  # why nothing was trained (no or unusable data): permanent for this version
    training: dict[str, Any] | None = None  # how it was trained: full or incremental, why, on how many examples
    withdraw: str | None = None  # why the published adapter is withdrawn instead (its data is gone)
    waiting: str | None = None  # why it is not trained yet, and that this is no failure (too few examples)
    lost: str | None = None  # an unexpected error of this adapter alone: the work is requested again
    live_examples: frozenset[str] | None = None  # the dataset's training example ids (what may stay learned)


def adapter_folder(settings: Settings, work: AdapterWork) -> Path:
    from lora_assets.adapters import adapter_dir

    return adapter_dir(settings.home, work.base_model, work.user, work.mode)


def train_and_gate(
    settings: Settings,
    base: LoadedBaseModel,
    works: Sequence[AdapterWork],
    progress: Callable[[str, int, int, float, float], None] | None = None,
    on_outcome: Callable[[AdapterOutcome], None] | None = None,
) -> list[AdapterOutcome]:
    """Train every adapter of ``works`` (all on ``base``) and evaluate each one's gate.

    Each adapter is planned (``plan_update``): a full training, or an incremental update that
    continues from the user's published adapter; an update that fails the gate is trained again
    in full, in the same call. A work whose dataset is missing, empty or unusable gets an
    ``error`` and is not trained; the others are unaffected. Jobs train as ``settings.fusion``
    resolves on the base's device (fused groups of at most ``settings.fuse``); each outcome goes
    to ``on_outcome`` as soon as it is final, also from the middle of a fused group.
    """
    from lora_assets.adapters import FULL, INCREMENTAL, TrainingPlan, job_for, plan_update
    from lora_assets.datasets import content_hash, read_dataset
    from lora_assets.gate import evaluate_gate
    from lora_assets.training import InvalidTrainingData, train_adapters, validate_job

    datasets, drive = settings.datasets(), settings.drive()
    outcomes = [AdapterOutcome(w, adapter_folder(settings, w)) for w in works]
    jobs: list[tuple[AdapterOutcome, TrainJob]] = []
    tables: dict[int, Any] = {}
    for outcome in outcomes:
        w = outcome.work
        if w.base_model != base.ref.key:
            raise ValueError(f"{w.name}: asked for base model {w.base_model}, loaded {base.ref.key}")
        mode = get_mode(w.mode)
        found = read_dataset(datasets, w.user, w.mode)
        if found is None:
            outcome.error = f"no {w.mode} dataset for user {w.user!r}: materialize {w.mode}/dataset first"
            continue
        df, _state = found
        outcome.dataset_version = content_hash(df)
        outcome.live_examples = live_examples(df)
        if not outcome.live_examples:
            outcome.withdraw = f"the user's {w.mode} dataset has no training example left"
            continue
        if not (df["split"] == "eval").any():
            outcome.waiting = too_few_examples(len(outcome.live_examples))
            continue
        published = published_adapter(settings, drive, w)
        plan = plan_update(mode, df, published[1] if published else None, base.ref.revision)
        job = job_for(
            mode, w.user, df, outcome.folder, **settings.step_budget, plan=plan,
            warm_start_from=published[0] if plan.path == INCREMENTAL else None,
            metadata={"dataset_version": outcome.dataset_version}, **settings.adapter_files,
        )
        try:
            validate_job(job)
        except InvalidTrainingData as exc:
            outcome.error = str(exc)
            continue
        jobs.append((outcome, job))
        tables[id(outcome)] = df
    if on_outcome is not None:
        for outcome in outcomes:
            if outcome.error or outcome.withdraw or outcome.waiting:
                on_outcome(outcome)
    by_job = {id(job): outcome for outcome, job in jobs}
    retrain: list[tuple[AdapterOutcome, TrainJob]] = []

    def gate(job: TrainJob, result: TrainResult) -> None:
        outcome = by_job[id(job)]
        outcome.result = result
        outcome.training = {k: job.metadata[k] for k in TRAINING_KEYS if job.metadata.get(k) is not None}
        try:
            outcome.gate = evaluate_gate(
                base, job, result, drive, outcome.work.user, outcome.work.mode,
                settings.gate(), outcome.live_examples,
            )
        except Exception as exc:  # this adapter's trouble (say, its drive folder): not the batch's
            outcome.lost = f"eval gate not evaluated ({type(exc).__name__}: {exc})"
            if on_outcome is not None:
                on_outcome(outcome)
            return
        if not outcome.gate.passed and job.metadata.get("training") == INCREMENTAL:
            why = f"the incremental update failed the eval gate ({outcome.gate.reason}): retrained in full"
            full = job_for(
                get_mode(outcome.work.mode), outcome.work.user, tables[id(outcome)], outcome.folder,
                **settings.step_budget, metadata={"dataset_version": outcome.dataset_version},
                plan=TrainingPlan(FULL, why, ()), **settings.adapter_files,
            )
            by_job[id(full)] = outcome
            retrain.append((outcome, full))
            return
        if on_outcome is not None:
            on_outcome(outcome)

    if jobs:
        train_adapters([j for _, j in jobs], base, progress=progress, fuse=settings.fuse, fusion=settings.fusion, on_saved=gate)
    if retrain:
        train_adapters([j for _, j in retrain], base, progress=progress, fuse=settings.fuse, fusion=settings.fusion, on_saved=gate)
    return outcomes


def live_examples(df) -> frozenset[str]:
    """The training example ids of a dataset: what an adapter of it may have learned."""
    return frozenset(df.loc[df["split"] == "train", "example_id"]) if len(df) else frozenset()


def too_few_examples(train: int) -> str:
    return (f"{train} training example(s) and none held out to gate an adapter on: it is trained once "
            "the dataset holds a held-out example (about 1 in 5 examples is held out)")


def published_adapter(settings: Settings, drive, work: AdapterWork) -> tuple[Path, dict[str, Any]] | None:
    """The user's published adapter (what their devices run), downloaded and verified into the
    data dir, and its ``lora_assets.json``; None when nothing (usable) is published."""
    from lora_assets.drive.publish import FORMATS, CorruptVersion, adapter_prefix, current_manifest, fetch_verified

    try:
        manifest = current_manifest(drive, work.user, work.base_model, work.mode)
        if manifest is None:
            return None
        folder = settings.home / "published" / work.base_model / work.user / work.mode / manifest["version"]
        if not (folder / "lora_assets.json").exists():
            files = fetch_verified(drive, adapter_prefix(work.user, work.base_model, work.mode), manifest, FORMATS["peft"])
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = folder.with_name(f".{folder.name}.tmp")
            tmp.mkdir(exist_ok=True)
            for name, data in files.items():
                (tmp / name).write_bytes(data)
            for old in folder.parent.iterdir():  # keep only the current version's copy
                if old.name != tmp.name and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
            tmp.rename(folder)
        meta = json.loads((folder / "lora_assets.json").read_text())
    except (CorruptVersion, FileNotFoundError, ValueError, KeyError):
        return None  # a damaged published version: train from scratch, and publish a good one
    return folder, {**meta, "version": manifest["version"]}


def published_copies(settings: Settings, work: AdapterWork) -> Path:
    """Where the data dir keeps the user's published versions it downloaded (warm starts)."""
    return settings.home / "published" / work.base_model / work.user / work.mode


def withdraw(settings: Settings, work: AdapterWork, reason: str):
    """Withdraw the published adapter (a tombstone for devices) and drop every local copy."""
    from lora_assets.drive.publish import withdraw_adapter

    working = adapter_folder(settings, work)
    for folder in [working, *unfinished_writes(working), published_copies(settings, work)]:
        shutil.rmtree(folder, ignore_errors=True)
    return withdraw_adapter(settings.drive(), work.user, work.base_model, work.mode, reason)


DELETED_REASON = "trained on records the user deleted"


def purge_deleted(settings: Settings, work: AdapterWork, live: frozenset[str]):
    """Remove every copy of the adapter trained on an example that is not in ``live`` (the
    dataset's training ids) any more: drive versions (CURRENT becomes a tombstone if it points at
    one), the data dir's downloaded copies and the working copy, and whatever a save killed
    mid-way left beside it. Returns the ``PurgeResult``.
    """
    from lora_assets.drive.publish import learned_deleted, purge_versions

    working = adapter_folder(settings, work)
    for leftover in unfinished_writes(working):  # a save killed before its rename: a copy nobody reads
        shutil.rmtree(leftover, ignore_errors=True)
    for folder in [working, *_subfolders(published_copies(settings, work))]:
        meta = folder / "lora_assets.json"
        try:
            metadata = json.loads(meta.read_text()) if meta.exists() else None
        except ValueError:
            metadata = None
        if not meta.exists() or learned_deleted(metadata, live):
            shutil.rmtree(folder, ignore_errors=True)  # a half-written copy, or one of deleted data
    return purge_versions(settings.drive(), work.user, work.base_model, work.mode, live, DELETED_REASON)


def _subfolders(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def publish(settings: Settings, work: AdapterWork) -> PublishResult | None:
    """Publish the working copy of ``work`` if its gate passed (None when it did not), then
    remove the versions trained on records deleted since (``purge_deleted``)."""
    from lora_assets.datasets import read_dataset
    from lora_assets.drive.publish import publish_adapter
    from lora_assets.gate import read_gate

    folder = adapter_folder(settings, work)
    gate = read_gate(folder)
    if gate is None or not gate.passed:
        return None
    published = publish_adapter(settings.drive(), work.user, work.base_model, work.mode, folder,
                                keep=settings.keep_versions)
    found = read_dataset(settings.datasets(), work.user, work.mode)
    if found is not None:
        purge_deleted(settings, work, live_examples(found[0]))
    return published


TRAINING_KEYS = ("training", "training_reason", "examples_trained", "incremental_streak", "warm_start_version")


def adapter_metadata(result: TrainResult, dataset_version: str, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an adapter materialization records (plain values, floats rounded for reading)."""
    weights = Path(result.output_dir) / "adapter_model.safetensors"
    improvement = (
        result.base_eval_loss - result.adapter_eval_loss
        if result.base_eval_loss is not None and result.adapter_eval_loss is not None
        else None
    )
    return {
        "base_model": result.base_model,
        "base_model_revision": result.base_model_revision,
        "base_eval_loss": _round(result.base_eval_loss),
        "adapter_eval_loss": _round(result.adapter_eval_loss),
        "eval_loss_improvement": _round(improvement),
        "final_train_loss": _round(result.loss_curve[-1]),
        "loss_curve": result.loss_curve,
        **{k: _round(v) for k, v in result.extra_metrics.items()},  # DPO: accuracy/margin before, after
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in result.timing().items()},
        "size_bytes": weights.stat().st_size,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "dataset_version": dataset_version,  # what the adapter sensor compares against
        **(training or {}),  # full or incremental, and why
        "path": str(result.output_dir),
    }


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)
