"""Plain metadata from the pipeline as the UI shows it: markdown loss curves, paths, previews."""

from __future__ import annotations

from typing import Any

import pandas as pd
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from lora_assets.datasets import RefreshedDataset

_BARS = "▁▂▃▄▅▆▇█"


def adapter_metadata(plain: dict[str, Any]) -> dict[str, Any]:
    """An adapter's metadata with the loss curve drawn and the folder as a path."""
    return {
        **{k: v for k, v in plain.items() if v is not None},
        "loss_curve": MetadataValue.md(loss_plot(plain["loss_curve"])),
        "path": MetadataValue.path(plain["path"]),
    }


def gate_metadata(gate) -> dict[str, Any]:
    return {
        "reason": gate.reason,
        "base_eval_loss": _r(gate.base_eval_loss),
        "adapter_eval_loss": _r(gate.adapter_eval_loss),
        "published_version": gate.published_version or "",
        "published_eval_loss": _r(gate.published_eval_loss),
        "margin": gate.margin,
        "tolerance": gate.tolerance,
    }


def dataset_metadata(refreshed: RefreshedDataset) -> dict[str, Any]:
    df = refreshed.df
    chars = int(df["prompt"].str.len().sum() + df["response"].str.len().sum()) if len(df) else 0
    return {
        "rows": len(df),
        "train_rows": int((df["split"] == "train").sum()),
        "eval_rows": int((df["split"] == "eval").sum()),
        "token_estimate": chars // 4,  # ~4 characters per token for English BPE
        "build": refreshed.report.how,
        "changed_records": refreshed.report.changed_records,
        "content_hash": refreshed.version,
        "skipped_records": len(refreshed.report.skipped),
        **({"skipped_ids": ", ".join(sorted(refreshed.report.skipped)[:20])
            + (f" (+{len(refreshed.report.skipped) - 20} more)" if len(refreshed.report.skipped) > 20 else "")}
           if refreshed.report.skipped else {}),
        "location": MetadataValue.path(refreshed.location),
        "preview": preview(df),
    }


def skipped_warning(mode: str, user: str, refreshed: RefreshedDataset) -> str | None:
    """The warning a dataset build logs when it skipped records no mode can use."""
    skipped = refreshed.report.skipped
    if not skipped:
        return None
    shown = "; ".join(f"{i}: {why}" for i, why in sorted(skipped.items())[:5])
    return f"{mode}/{user}: skipped {len(skipped)} unusable record(s): {shown}" + (" ..." if len(skipped) > 5 else "")


def publish_metadata(published, prefix: str) -> dict[str, Any]:
    return {
        "version": published.version,
        "current_flipped": published.flipped,
        "previous_version": published.previous or "",
        "deleted_versions": ", ".join(published.deleted_versions),
        "drive_prefix": prefix,
    }


def loss_plot(curve: list[float]) -> str:
    """A sparkline plus a step/loss table: readable in the UI's metadata panel."""
    lo, hi = min(curve), max(curve)
    span = (hi - lo) or 1.0
    spark = "".join(_BARS[int((v - lo) / span * (len(_BARS) - 1))] for v in curve)
    rows = "\n".join(f"| {i} | {v:.4f} |" for i, v in enumerate(curve, start=1))
    return f"**training loss** {curve[0]:.3f} → {curve[-1]:.3f}\n\n`{spark}`\n\n| step | loss |\n|---|---|\n{rows}"


def preview(df: pd.DataFrame, n: int = 5) -> MetadataValue:
    cols = ["example_id", "split", "prompt", "response"] + (["rejected"] if (df["rejected"] != "").any() else [])
    return MetadataValue.table(
        records=[TableRecord({c: str(getattr(r, c))[:120] for c in cols}) for r in df.head(n).itertuples(index=False)],
        schema=TableSchema(columns=[TableColumn(c, "string") for c in cols]),
    )


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
