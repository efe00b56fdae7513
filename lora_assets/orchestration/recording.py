"""What a run records, in two places: each user's outcome in the state table, and a summary per
asset in the Dagster event log.

Per user (``lora_assets.state``): the dataset version built, the adapter trained and its gate
verdict, what was published or withdrawn, a failure that will not go away. The sensors, the
retry of a killed run and ``lora-assets status`` read these rows.

Per asset and run (Dagster): one ``ASSET_MATERIALIZATION_PLANNED`` when the run starts (so the
asset shows the run in progress, and as failed if it dies before recording), then one
materialization whose metadata counts what happened to the run's users (built, trained, passed,
failed, published, withdrawn; losses and timings aggregated) with a digest of the versions as
its data version, and one ``eval_gate`` evaluation per mode and base model. No user id and no
user text: a million users would otherwise put a copy of their mail and ~28 rows per retrained
adapter into the orchestrator's database (README: Scale).

``record_outcome`` is the one way an adapter's outcome is recorded, for asset runs (the UI) and
batch runs (the sensors, ``lora-assets backfill``) alike.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    AssetMaterialization,
    DagsterEvent,
    DagsterEventType,
    DagsterInstance,
    OpExecutionContext,
    PartitionsDefinition,
)

from lora_assets.orchestration.internals import (
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    AssetCheckEvaluationPlanned,
    AssetCheckEvaluationTargetMaterializationData,
    AssetMaterializationPlannedData,
)
from lora_assets.orchestration.keys import adapter_key, published_key

Slot = tuple[AssetKey, str | None]  # an asset and its partition (a base model) or None
# What an adapter's outcome can be once its run is done with it (``record_outcome``).
FINISHED = ("trained", "gate_failed", "not_trained", "waiting", "withdrawn")


def plan(
    context: OpExecutionContext,
    assets: Sequence[Slot],
    checks: Sequence[tuple[AssetKey, str, str | None, PartitionsDefinition | None]] = (),
) -> None:
    """Announce the assets (and checks) this run will record, once each."""
    instance, run_id, job = context.instance, context.run.run_id, context.job_name
    for key, partition in dict.fromkeys(assets):
        instance.report_dagster_event(
            DagsterEvent.build_asset_materialization_planned_event(
                job, context.op_handle.name, AssetMaterializationPlannedData(key, partition=partition)
            ),
            run_id,
        )
    for key, check, partition, partitions_def in dict.fromkeys(checks):
        subset = partitions_def.empty_subset().with_partition_keys([partition]) if partition else None
        instance.report_dagster_event(
            DagsterEvent(
                event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION_PLANNED.value,
                job_name=job,
                message=f"{job} intends to execute asset check {check} on asset {key.to_string()}",
                event_specific_data=AssetCheckEvaluationPlanned(asset_key=key, check_name=check,
                                                                partitions_subset=subset),
            ),
            run_id,
        )


class Summary:
    """What a run did to its users, per asset: counts, sums and a digest of versions."""

    def __init__(self) -> None:
        self.counts: dict[Slot, Counter] = defaultdict(Counter)
        self.sums: dict[Slot, Counter] = defaultdict(Counter)
        self.versions: dict[Slot, list[str]] = defaultdict(list)
        self.expected: Counter = Counter()  # adapters a run set out to gate, per slot

    def expect(self, key: AssetKey, partition: str | None, adapters: int) -> None:
        """Announce how many adapters of a slot this run will gate: a run that stops before all
        of them records how many it did not (``not_gated``), and its gate check fails."""
        self.expected[(key, partition)] += adapters
        self.counts[(key, partition)].update({})  # the slot is recorded even if nothing finishes

    def not_gated(self, key: AssetKey, partition: str | None = None) -> int:
        counts = self.counts[(key, partition)]
        return max(0, self.expected[(key, partition)] - sum(counts[k] for k in FINISHED))

    def add(self, key: AssetKey, partition: str | None, outcome: str, version: str | None = None,
            **sums: float) -> None:
        slot = (key, partition)
        self.counts[slot][outcome] += 1
        self.sums[slot].update({k: v for k, v in sums.items() if v is not None})
        if version:
            self.versions[slot].append(version)

    def slots(self) -> list[Slot]:
        return list(self.counts)

    def data_version(self, key: AssetKey, partition: str | None = None) -> str:
        digest = hashlib.sha256("\n".join(sorted(self.versions[(key, partition)])).encode())
        return digest.hexdigest()[:16]

    def metadata(self, key: AssetKey, partition: str | None = None) -> dict[str, Any]:
        counts, sums = self.counts[(key, partition)], self.sums[(key, partition)]
        out: dict[str, Any] = {"users": sum(counts.values()), **dict(sorted(counts.items()))}
        out.update({k: round(v, 4) for k, v in sorted(sums.items())})
        for name in MEAN_LOSSES:
            out.pop(name, None)
        if counts.get("trained") or counts.get("gate_failed"):
            gated = counts.get("trained", 0) + counts.get("gate_failed", 0)
            out["mean_eval_loss_improvement"] = round(sums.get("eval_loss_improvement", 0.0) / gated, 4)
            for name in MEAN_LOSSES:
                scored = sums.get("retrieval_scored", 0) if name.startswith("retrieval") else gated
                if name in sums and scored:
                    out[f"mean_{name}"] = round(sums[name] / scored, 4)
        if self.expected[(key, partition)]:
            out["not_gated"] = self.not_gated(key, partition)
        out["versions_digest"] = self.data_version(key, partition)
        return out

    def flush(self, context: OpExecutionContext, skip: Sequence[AssetKey] = ()) -> None:
        """Log one materialization per asset this run touched (except ``skip``: an asset body
        returns its own)."""
        for key, partition in self.slots():
            if key in skip:
                continue
            tags = {DATA_VERSION_TAG: self.data_version(key, partition), DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
            context.log_event(AssetMaterialization(key, partition=partition, metadata=self.metadata(key, partition),
                                                   tags=tags))


MEAN_LOSSES = ("base_eval_loss", "adapter_eval_loss", "retrieval_eval_loss")  # shown as mean_<name> per run


def _losses(gate) -> dict[str, float | None]:
    """The gate's held-out losses, summed per run so the materialization shows their means."""
    out = {"base_eval_loss": gate.base_eval_loss, "adapter_eval_loss": gate.adapter_eval_loss}
    if gate.retrieval_eval_loss is not None and gate.adapter_eval_loss is not None:
        out.update(retrieval_eval_loss=gate.retrieval_eval_loss, retrieval_scored=1,
                   beat_retrieval=int(gate.adapter_eval_loss < gate.retrieval_eval_loss),
                   retrieval_helps=int(gate.retrieval_helps))
    return out


def gate_evaluation(summary: Summary, adapter: AssetKey, check_name: str, partition: str | None,
                    target=None) -> AssetCheckEvaluation:
    """The run's ``eval_gate`` verdict on one mode and base model: passed when no adapter failed
    its gate; how many passed and failed in the metadata (which users: ``lora-assets status``).
    ``target``: the materialization record it judged (the UI links the two)."""
    counts = summary.counts[(adapter, partition)]
    failed, unfinished = counts.get("gate_failed", 0), summary.not_gated(adapter, partition)
    words = [f"{failed} adapter(s) did not pass; their devices keep the published version "
             "(`lora-assets status --state stale` lists them)"] if failed else []
    if unfinished:
        words.append(f"{unfinished} adapter(s) were not gated: the run stopped first, and a retry trains them")
    return AssetCheckEvaluation(
        asset_key=adapter, check_name=check_name, passed=failed == 0 and unfinished == 0, partition=partition,
        metadata={"passed": counts.get("trained", 0), "failed": failed, "not_trained": counts.get("not_trained", 0),
                  "withdrawn": counts.get("withdrawn", 0), "not_gated": unfinished},
        description="; ".join(words) or None,
        target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
            storage_id=target.storage_id, run_id=target.run_id, timestamp=target.timestamp) if target else None,
    )


def record_dataset(context: OpExecutionContext, settings, summary: Summary, key: AssetKey, mode: str,
                   user: str, refreshed) -> None:
    """A rebuilt dataset: the user's row in the state table, the run's count, and a warning
    naming the records no mode can use."""
    from lora_assets.orchestration.metadata import skipped_warning

    if warning := skipped_warning(mode, user, refreshed):
        context.log.warning(warning)
    df = refreshed.df
    train_rows = int((df["split"] == "train").sum()) if len(df) else 0
    settings.state().record_dataset(user, mode, refreshed.version, len(df), train_rows, context.run.run_id)
    summary.add(key, None, refreshed.report.how, refreshed.version, rows=len(df), train_rows=train_rows,
                changed_records=refreshed.report.changed_records, skipped_records=len(refreshed.report.skipped))


def record_published(context: OpExecutionContext, settings, summary: Summary, work, published) -> None:
    """A publication (a ``PublishResult``): the user's row and history, and the run's count."""
    settings.state().record_published(work.base_model, work.user, work.mode, published.version, context.run.run_id)
    summary.add(published_key(work.mode), work.base_model, "published", published.version,
                deleted_versions=len(published.deleted_versions))


def record_outcome(context: OpExecutionContext, settings, summary: Summary, outcome, publish_fn) -> str:
    """Record one adapter's outcome as soon as its gate is known, and publish it if it passed.

    ``publish_fn(work)`` publishes and returns the ``PublishResult`` (None: leave publication
    to the run's ``published`` step).
    Returns what happened: forgotten, not_trained, waiting (too few examples: no failure),
    withdrawn, gate_failed, trained (passed, not published here), published, or publish_failed
    and lost (the drive was unreachable, an unexpected error: lost work, requested again).
    An outcome that publishes nothing removes the copies trained on records deleted since
    (``_purge``); a publication does so itself (``pipeline.publish``).
    """
    from lora_assets.orchestration.metadata import gate_metadata
    from lora_assets.orchestration.registry import is_forgotten
    from lora_assets.pipeline import adapter_metadata, withdraw

    w = outcome.work
    state, run_id, base = settings.state(), context.run.run_id, w.base_model
    adapter, published_asset = adapter_key(w.mode), published_key(w.mode)
    if is_forgotten(context.instance, w.user):  # forgotten while training: keep nothing of it
        shutil.rmtree(outcome.folder, ignore_errors=True)
        return "forgotten"
    if outcome.withdraw:
        withdrawn = withdraw(settings, w, outcome.withdraw)
        state.record_withdrawn(base, w.user, w.mode, outcome.withdraw, outcome.dataset_version, run_id)
        summary.add(adapter, base, "withdrawn")
        summary.add(published_asset, base, "withdrawn", deleted_versions=len(withdrawn.deleted_versions))
        context.log.info(f"[{w.name}] withdrawn: {outcome.withdraw}; devices remove it at their next sync")
        return "withdrawn"
    if outcome.lost:
        summary.add(adapter, base, "lost")
        context.log.error(f"[{w.name}] {outcome.lost}; requested again")
        return "lost"
    if outcome.error:
        state.record_failure(base, w.user, w.mode, f"not trained: {outcome.error}", run_id)
        summary.add(adapter, base, "not_trained")
        context.log.error(f"[{w.name}] not trained: {outcome.error}")
        return _purge(context, settings, summary, outcome, "not_trained")
    if outcome.waiting:
        state.record_waiting(base, w.user, w.mode, outcome.waiting, run_id)
        summary.add(adapter, base, "waiting")
        context.log.info(f"[{w.name}] not trained yet: {outcome.waiting}")
        return _purge(context, settings, summary, outcome, "waiting")
    plain = adapter_metadata(outcome.result, outcome.dataset_version, outcome.training)
    gate = {"passed": outcome.gate.passed, **gate_metadata(outcome.gate)}
    state.record_adapter(base, w.user, w.mode, trained_on=plain.get("dataset_version"), adapter_version=plain["sha256"],
                         steps=plain.get("steps"), gate=gate, run_id=run_id,
                         training={k: v for k, v in plain.items() if k not in ("loss_curve", "path")})
    improvement = plain.get("eval_loss_improvement")
    summary.add(adapter, base, "trained" if outcome.gate.passed else "gate_failed", plain["sha256"],
                steps=plain.get("steps"), train_tokens=plain.get("train_tokens"), eval_loss_improvement=improvement,
                size_bytes=plain.get("size_bytes"), **_losses(outcome.gate))
    line = f"[{w.name}] {plain['steps']} steps, eval loss {plain['base_eval_loss']} -> {plain['adapter_eval_loss']}"
    if not outcome.gate.passed:
        context.log.warning(f"{line}; eval gate failed: {outcome.gate.reason}")
        return _purge(context, settings, summary, outcome, "gate_failed")
    if publish_fn is None:
        context.log.info(line)
        return "trained"
    try:
        published = publish_fn(w)
    except Exception as exc:  # the drive is unreachable: lost work, requested again
        summary.add(published_asset, base, "publish_failed")
        context.log.error(f"{line}; not published ({type(exc).__name__}): {exc}")
        return "publish_failed"
    record_published(context, settings, summary, w, published)
    context.log.info(f"{line}; published {published.version} (flipped: {published.flipped})")  # one line per adapter
    return "published"


def _purge(context: OpExecutionContext, settings, summary: Summary, outcome, what: str) -> str:
    """Remove the copies of an unpublished outcome's adapter trained on records deleted since.
    If CURRENT pointed at one it is withdrawn (devices fall back to the base model) and the user
    is recorded as such. Returns ``what`` happened, or publish_failed when the drive failed."""
    from lora_assets.pipeline import DELETED_REASON, purge_deleted

    w = outcome.work
    if outcome.live_examples is None:
        return what
    try:
        purged = purge_deleted(settings, w, outcome.live_examples)
    except Exception as exc:  # the drive is unreachable: requested again, until the copies are gone
        summary.add(published_key(w.mode), w.base_model, "publish_failed")
        context.log.error(f"[{w.name}] copies trained on deleted records not removed ({type(exc).__name__}): {exc}")
        return "publish_failed"
    if purged.deleted_versions:
        summary.add(published_key(w.mode), w.base_model, "purged", deleted_versions=len(purged.deleted_versions))
        context.log.info(f"[{w.name}] removed {len(purged.deleted_versions)} version(s) {DELETED_REASON}")
    if purged.current_deleted:
        why = outcome.gate.reason if outcome.gate is not None else (outcome.error or outcome.waiting)
        reason = f"the published adapter was {DELETED_REASON}; nothing replaces it yet ({why})"
        settings.state().record_withdrawn(w.base_model, w.user, w.mode, reason, outcome.dataset_version,
                                          context.run.run_id)
        summary.add(published_key(w.mode), w.base_model, "withdrawn")
        context.log.warning(f"[{w.name}] withdrawn: {reason}; devices remove it at their next sync")
    return what


def latest_materialization(instance: DagsterInstance, key: AssetKey, partition: str | None = None):
    """The newest materialization of an asset (partition), or None."""
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition else None), limit=1
    ).records
    return records[0] if records else None


def latest_materializations(instance: DagsterInstance, key: AssetKey, partitions: Sequence[str]) -> dict[str, Any]:
    """Partition -> its latest materialization record, for many partitions in two indexed queries
    (the migration reads the per-user partitions of a deployment from before the state table)."""
    from dagster import AssetRecordsFilter

    ids = instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION, set(partitions))
    if not ids:
        return {}
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, storage_ids=list(ids.values())), limit=len(ids)
    ).records
    return {r.partition_key: r for r in records}
