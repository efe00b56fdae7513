"""Asset factories: one asset per source, and a dataset and an adapter asset per declared mode.

The graph's edges are the mode declarations: ``<mode>/dataset`` depends on exactly the mode's
sources, ``<mode>/adapter`` on the mode's dataset (user dimension of base_model x user).
"""


import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetsDefinition,
    BackfillPolicy,
    DataVersion,
    Failure,
    MaterializeResult,
    MetadataValue,
    MultiToSingleDimensionPartitionMapping,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from lora_assets.adapters import adapter_dir, job_for
from lora_assets.data.schemas import SOURCES
from lora_assets.data.user_store import table_fingerprint
from lora_assets.datasets import (
    build_dataset,
    content_hash,
    read_dataset,
    write_dataset,
)
from lora_assets.drive.publish import adapter_prefix, publish_adapter
from lora_assets.gate import GateResult, evaluate_gate, read_gate
from lora_assets.modes import MODES, Mode
from lora_assets.orchestration.partitions import (
    adapter_partitions,
    split_adapter_key,
    users_partitions,
)
from lora_assets.orchestration.resources import LoraAssetsHome

OWNERS = ["team:ml-platform"]
TRAINING_POOL = "training"
ADAPTER_PARTITIONS_PER_RUN = 8  # backfills train up to this many adapters per run, one base load


def source_key(source: str) -> AssetKey:
    return AssetKey(["sources", source])


def dataset_key(mode: str) -> AssetKey:
    return AssetKey([mode, "dataset"])


def adapter_key(mode: str) -> AssetKey:
    return AssetKey([mode, "adapter"])


def published_key(mode: str) -> AssetKey:
    return AssetKey([mode, "published"])


GATE_CHECK = "eval_gate"


def build_source_asset(source: str) -> AssetsDefinition:
    @asset(
        key=source_key(source),
        partitions_def=users_partitions,
        group_name="sources",
        kinds={"parquet"},
        owners=OWNERS,
        description=(
            f"A user's `{source}` records in the user store. Materializing records the current "
            "content fingerprint as the data version, so downstream datasets rebuild only when "
            "the records really changed."
        ),
    )
    def _source(context: AssetExecutionContext, lora_home: LoraAssetsHome) -> MaterializeResult:
        table, head = lora_home.store().read_at_head(context.partition_key, source)
        fingerprint = table_fingerprint(table)
        return MaterializeResult(
            data_version=DataVersion(fingerprint),
            metadata={"records": table.num_rows, "log_head": head, "fingerprint": fingerprint},
        )

    return _source


def build_dataset_asset(mode: Mode) -> AssetsDefinition:
    @asset(
        key=dataset_key(mode.name),
        deps=[source_key(s) for s in mode.sources],
        partitions_def=users_partitions,
        group_name=mode.name,
        kinds={"parquet", "pandas"},
        owners=OWNERS,
        description=(
            f"{mode.description} Training examples (system, prompt, response, split) built from "
            f"{', '.join(mode.sources)}; rebuilt incrementally from the change log."
        ),
    )
    def _dataset(context: AssetExecutionContext, lora_home: LoraAssetsHome) -> MaterializeResult:
        user = context.partition_key
        datasets = lora_home.datasets()
        previous = read_dataset(datasets, user, mode.name)
        df, state, report = build_dataset(lora_home.store(), mode, user, previous)
        key = write_dataset(datasets, user, mode.name, df, state)
        version = content_hash(df)
        context.log.info(f"{mode.name}/{user}: {report.how} build, {report.changed_records} records reduced")
        chars = int(df["prompt"].str.len().sum() + df["response"].str.len().sum()) if len(df) else 0
        return MaterializeResult(
            data_version=DataVersion(version),
            metadata={
                "rows": len(df),
                "train_rows": int((df["split"] == "train").sum()),
                "eval_rows": int((df["split"] == "eval").sum()),
                "token_estimate": chars // 4,  # ~4 characters per token for English BPE
                "build": report.how,
                "changed_records": report.changed_records,
                "content_hash": version,
                "location": MetadataValue.path(datasets.uri(key)),
                "preview": _preview(df),
            },
        )

    return _dataset


def build_adapter_asset(mode: Mode) -> AssetsDefinition:
    @asset(
        key=adapter_key(mode.name),
        deps=[
            AssetDep(
                dataset_key(mode.name),
                partition_mapping=MultiToSingleDimensionPartitionMapping(partition_dimension_name="user"),
            )
        ],
        partitions_def=adapter_partitions,
        group_name=mode.name,
        kinds={"pytorch", "safetensors"},
        owners=OWNERS,
        pool=TRAINING_POOL,
        backfill_policy=BackfillPolicy.multi_run(ADAPTER_PARTITIONS_PER_RUN),
        check_specs=[
            AssetCheckSpec(
                GATE_CHECK,
                asset=adapter_key(mode.name),
                blocking=True,
                partitions_def=adapter_partitions,  # one verdict per (base model, user)
                description=(
                    "Publish only if held-out loss beats the base model by the configured margin "
                    "and does not regress against the published version on the same held-out set."
                ),
            )
        ],
        description=(
            f"{mode.description} A LoRA adapter (r={mode.lora.r}, alpha={mode.lora.alpha} on "
            f"{'/'.join(m.split('_')[0] for m in mode.lora.target_modules)}) per base model and "
            "user, trained on the user's dataset; a standard PEFT folder."
        ),
    )
    def _adapter(context: AssetExecutionContext, lora_home: LoraAssetsHome):
        keys = list(context.partition_keys)
        by_base: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key in keys:
            base_model, user = split_adapter_key(key)
            by_base[base_model].append((key, user))
        metadata: dict[str, dict[str, Any]] = {}
        for base_model, items in by_base.items():
            metadata.update(train_mode_adapters(context, lora_home, mode, base_model, items))
        if len(keys) == 1:
            meta, gate = metadata[keys[0]]
            return MaterializeResult(
                data_version=DataVersion(meta["sha256"]),
                metadata=meta,
                check_results=[AssetCheckResult(check_name=GATE_CHECK, passed=gate.passed, metadata=_gate_metadata(gate))],
            )
        # A backfill run over several partitions: metadata and gate verdict per partition. The
        # published step re-reads each partition's verdict, since one blocking result cannot
        # speak for a whole range.
        for key, (meta, gate) in metadata.items():
            context.add_asset_metadata(meta, partition_key=key)
            context.log_event(
                AssetCheckEvaluation(
                    asset_key=adapter_key(mode.name),
                    check_name=GATE_CHECK,
                    passed=gate.passed,
                    metadata=_gate_metadata(gate),
                    partition=key,
                    blocking=True,
                )
            )
        # The op still owes one result for the check's output. It must not block the range's
        # publish step: that step re-reads every partition's verdict and publishes only passes.
        failed = sorted(k for k, (_meta, gate) in metadata.items() if not gate.passed)
        return MaterializeResult(
            check_results=[
                AssetCheckResult(
                    check_name=GATE_CHECK,
                    passed=True,
                    description="Range run: verdicts are recorded per partition",
                    metadata={"partitions": len(metadata), "failed_partitions": ", ".join(failed)},
                )
            ]
        )

    return _adapter


def train_mode_adapters(
    context: AssetExecutionContext,
    lora_home: LoraAssetsHome,
    mode: Mode,
    base_model: str,
    items: list[tuple[str, str]],
) -> dict[str, tuple[dict[str, Any], GateResult]]:
    """Train the adapters of ``mode`` for (partition key, user) pairs on one loaded base model;
    per partition key, the materialization metadata and the eval-gate verdict."""
    from lora_assets.orchestration.base_cache import loaded_base_model
    from lora_assets.training import train_adapters

    home = lora_home.path
    datasets, drive = lora_home.datasets(), lora_home.drive()  # one client each, not one per user
    jobs = []
    for _key, user in items:
        found = read_dataset(datasets, user, mode.name)
        if found is None:
            raise FileNotFoundError(
                f"no {mode.name} dataset for user {user!r}: materialize {mode.name}/dataset first"
            )
        df, _state = found
        jobs.append(
            job_for(
                mode,
                user,
                df,
                adapter_dir(home, base_model, user, mode.name),
                steps=lora_home.steps_override(),
                metadata={"dataset_version": content_hash(df)},
            )
        )

    def progress(job: str, step: int, total: int, loss: float, tps: float) -> None:
        if step == total or step % 5 == 0:
            context.log.info(f"[{job}] step {step}/{total} loss {loss:.4f} {tps:.0f} tok/s")

    base = loaded_base_model(base_model, home)
    results = train_adapters(jobs, base, progress=progress)
    out = {}
    for (key, user), job, result in zip(items, jobs, results):
        gate = evaluate_gate(
            base, job, result, drive, user, mode.name, lora_home.gate_margin, lora_home.gate_tolerance
        )
        context.log.info(f"[{job.name}] gate {'passed' if gate.passed else 'FAILED'}: {gate.reason}")
        out[key] = (_adapter_metadata(result, job.metadata["dataset_version"]), gate)
    return out


def _gate_metadata(gate) -> dict[str, Any]:
    return {
        "reason": gate.reason,
        "base_eval_loss": gate.base_eval_loss,
        "adapter_eval_loss": gate.adapter_eval_loss,
        "published_version": gate.published_version or "",
        "published_eval_loss": gate.published_eval_loss,
        "margin": gate.margin,
        "tolerance": gate.tolerance,
    }


def build_published_asset(mode: Mode) -> AssetsDefinition:
    @asset(
        key=published_key(mode.name),
        deps=[adapter_key(mode.name)],
        partitions_def=adapter_partitions,
        group_name=mode.name,
        kinds={"safetensors", "folder"},
        owners=OWNERS,
        backfill_policy=BackfillPolicy.multi_run(ADAPTER_PARTITIONS_PER_RUN),
        description=(
            f"The {mode.name} adapter as published to the user's drive: an immutable version folder "
            "with a manifest of sha256s, and the CURRENT pointer devices sync from. Runs only when "
            "the adapter's eval gate passed."
        ),
    )
    def _published(context: AssetExecutionContext, lora_home: LoraAssetsHome) -> MaterializeResult:
        results, gated = {}, {}
        drive = lora_home.drive()
        for key in context.partition_keys:
            base_model, user = split_adapter_key(key)
            folder = adapter_dir(lora_home.path, base_model, user, mode.name)
            gate = read_gate(folder)
            if gate is None or not gate.passed:
                # Blocking checks stop this step in single-partition runs; backfill runs reach
                # here with every partition, so the gate is re-read per partition.
                gated[key] = gate.reason if gate else "never evaluated"
                continue
            published = publish_adapter(drive, user, base_model, mode.name, folder, keep=lora_home.keep_versions)
            context.log.info(f"[{user}/{mode.name}] published {published.version} (flipped: {published.flipped})")
            results[key] = {
                "version": published.version,
                "current_flipped": published.flipped,
                "previous_version": published.previous or "",
                "deleted_versions": ", ".join(published.deleted_versions),
                "drive_prefix": adapter_prefix(user, base_model, mode.name),
            }
        if gated:
            for key, meta in results.items():  # record what did get published, then fail
                context.log_event(AssetMaterialization(published_key(mode.name), partition=key, metadata=meta))
            raise Failure(
                f"{mode.name}: not published, eval gate failed for "
                + "; ".join(f"{k}: {reason}" for k, reason in sorted(gated.items()))
            )
        if len(results) == 1:
            (meta,) = results.values()
            return MaterializeResult(data_version=DataVersion(meta["version"]), metadata=meta)
        for key, meta in results.items():
            context.add_asset_metadata(meta, partition_key=key)
        return MaterializeResult()

    return _published


def _adapter_metadata(result, dataset_version: str) -> dict[str, Any]:
    weights = Path(result.output_dir) / "adapter_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    return {
        "base_model": result.base_model,
        "base_model_revision": result.base_model_revision,
        "base_eval_loss": result.base_eval_loss,
        "adapter_eval_loss": result.adapter_eval_loss,
        "eval_loss_improvement": (
            result.base_eval_loss - result.adapter_eval_loss
            if result.base_eval_loss is not None and result.adapter_eval_loss is not None
            else None
        ),
        "final_train_loss": result.loss_curve[-1],
        "loss_curve": MetadataValue.md(_loss_plot(result.loss_curve)),
        **{k: round(v, 4) for k, v in result.extra_metrics.items()},  # DPO: accuracy/margin before, after
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_seconds": round(result.seconds, 2),
        "size_bytes": weights.stat().st_size,
        "sha256": sha,
        "dataset_version": dataset_version,  # what the adapter sensor compares against
        "path": MetadataValue.path(str(result.output_dir)),
    }


_BARS = "▁▂▃▄▅▆▇█"


def _loss_plot(curve: list[float]) -> str:
    """A sparkline plus a step/loss table: readable in the UI's metadata panel."""
    lo, hi = min(curve), max(curve)
    span = (hi - lo) or 1.0
    spark = "".join(_BARS[int((v - lo) / span * (len(_BARS) - 1))] for v in curve)
    rows = "\n".join(f"| {i} | {v:.4f} |" for i, v in enumerate(curve, start=1))
    return f"**training loss** {curve[0]:.3f} → {curve[-1]:.3f}\n\n`{spark}`\n\n| step | loss |\n|---|---|\n{rows}"


def _preview(df, n: int = 5) -> MetadataValue:
    cols = ["example_id", "split", "prompt", "response"] + (["rejected"] if (df["rejected"] != "").any() else [])
    return MetadataValue.table(
        records=[
            TableRecord({c: str(getattr(r, c))[:120] for c in cols})
            for r in df.head(n).itertuples(index=False)
        ],
        schema=TableSchema(columns=[TableColumn(c, "string") for c in cols]),
    )


def all_assets() -> list[AssetsDefinition]:
    """Every asset, generated from the sources and the mode declarations."""
    return [
        *(build_source_asset(s) for s in SOURCES),
        *(build_dataset_asset(m) for m in MODES.values()),
        *(build_adapter_asset(m) for m in MODES.values()),
        *(build_published_asset(m) for m in MODES.values()),
    ]
