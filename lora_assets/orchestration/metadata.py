"""Plain values from the pipeline as runs record them: the gate verdict, skipped-record warnings."""

from __future__ import annotations

import math
from typing import Any

from lora_assets.datasets import RefreshedDataset


def gate_metadata(gate) -> dict[str, Any]:
    return {
        "reason": gate.reason,
        "base_eval_loss": _r(gate.base_eval_loss),
        "adapter_eval_loss": _r(gate.adapter_eval_loss),
        "published_version": gate.published_version or "",
        "published_eval_loss": _r(gate.published_eval_loss),
        "retrieval_eval_loss": _r(gate.retrieval_eval_loss),
        "adapter_retrieval_eval_loss": _r(gate.adapter_retrieval_eval_loss),
        "retrieval_helps": gate.retrieval_helps,
        "margin": gate.margin,
        "confidence": gate.confidence,
        "noise": gate.noise,
        "noise_floor": gate.noise_floor,
        **({"vs_published": _r(gate.vs_published.difference),
            "vs_published_lower": _r(gate.vs_published.lower),
            "vs_published_upper": _r(gate.vs_published.upper)} if gate.vs_published else {}),
    }


def skipped_warning(mode: str, user: str, refreshed: RefreshedDataset) -> str | None:
    """The warning a dataset build logs when it skipped records no mode can use."""
    skipped = refreshed.report.skipped
    if not skipped:
        return None
    shown = "; ".join(f"{i}: {why}" for i, why in sorted(skipped.items())[:5])
    return f"{mode}/{user}: skipped {len(skipped)} unusable record(s): {shown}" + (" ..." if len(skipped) > 5 else "")


def _r(value: float | None) -> float | None:
    """Rounded for reading; None also for an infinite bound (confidence 1.0), which JSON lacks."""
    return None if value is None or not math.isfinite(value) else round(float(value), 4)
