"""Asset factories: one asset per source, and a dataset and an adapter asset per declared mode.

The graph's edges are the mode declarations: ``<mode>/dataset`` depends on exactly the mode's
sources, ``<mode>/adapter`` on the mode's dataset (user dimension of base_model x user).
"""


import hashlib
from collections import defaultdict
from pathlib import Path
from typing import Any

from dagster import (
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    BackfillPolicy,
    DataVersion,
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
from lora_assets.datasets import build_dataset, content_hash, dataset_path, read_dataset, write_dataset
from lora_assets.modes import MODES, Mode
from lora_assets.orchestration.partitions import adapter_partitions, split_adapter_key, users_partitions
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
        path = dataset_path(lora_home.path, user, mode.name)
        df, state, report = build_dataset(lora_home.store(), mode, user, read_dataset(path))
        write_dataset(path, df, state)
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
                "path": MetadataValue.path(str(path)),
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
        description=(
            f"{mode.description} A LoRA adapter (r={mode.lora.r}, alpha={mode.lora.alpha} on "
            f"{'/'.join(m.split('_')[0] for m in mode.lora.target_modules)}) per base model and "
            "user, trained on the user's dataset; a standard PEFT folder."
        ),
    )
    def _adapter(context: AssetExecutionContext, lora_home: LoraAssetsHome) -> MaterializeResult:
        keys = list(context.partition_keys)
        by_base: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for key in keys:
            base_model, user = split_adapter_key(key)
            by_base[base_model].append((key, user))
        metadata: dict[str, dict[str, Any]] = {}
        for base_model, items in by_base.items():
            metadata.update(train_mode_adapters(context, lora_home, mode, base_model, items))
        if len(keys) == 1:
            meta = metadata[keys[0]]
            return MaterializeResult(data_version=DataVersion(meta["sha256"]), metadata=meta)
        for key, meta in metadata.items():  # a backfill run: one event per partition
            context.add_asset_metadata(meta, partition_key=key)
        return MaterializeResult()

    return _adapter


def train_mode_adapters(
    context: AssetExecutionContext,
    lora_home: LoraAssetsHome,
    mode: Mode,
    base_model: str,
    items: list[tuple[str, str]],
) -> dict[str, dict[str, Any]]:
    """Train the adapters of ``mode`` for (partition key, user) pairs on one loaded base model."""
    from lora_assets.orchestration.base_cache import loaded_base_model
    from lora_assets.training import train_adapters

    home = lora_home.path
    jobs = []
    for _key, user in items:
        found = read_dataset(dataset_path(home, user, mode.name))
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
    return {
        key: _adapter_metadata(r, job.metadata["dataset_version"])
        for (key, _user), job, r in zip(items, jobs, results)
    }


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
    cols = ["example_id", "split", "prompt", "response"]
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
    ]
