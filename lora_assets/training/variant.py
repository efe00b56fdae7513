"""How a call's jobs train, decided once: sequential, interleaved or batched.

peft resolves a LoRA variant once per layer and every forward then follows it; the training path
is resolved the same way, once per call, into groups that each train one way:

- ``sequential``: peft's own LoRA layers, one job after another (DPO, dropout, a lone job);
- ``interleaved``: one fused group, one job's rows per pass, jobs taking turns each step;
- ``batched``: one fused group, every job's rows in one pass per step (``torch.bmm`` over the
  jobs' A/B), so the frozen base's GEMMs get K times the rows.

``auto`` picks ``batched`` on a GPU and ``sequential`` on a CPU: on 2 CPU cores one job's
8 x 128 tokens already fill the GEMMs (fused K=8 measured 1.01x sequential), so a group would
only make a small user wait for the passes of a large one. Jobs are planned shortest budget
first: within a call the small users' adapters are ready first, and a batched group holds jobs
of similar length, so its passes stay full for longer.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_assets.training.jobs import TrainJob
from lora_assets.training.objectives import training_for

SEQUENTIAL, INTERLEAVED, BATCHED = "sequential", "interleaved", "batched"
AUTO = "auto"
FUSIONS = (AUTO, SEQUENTIAL, INTERLEAVED, BATCHED)


@dataclass(frozen=True)
class TrainingGroup:
    """Jobs (indices into the call's list) that train together one way."""

    variant: str
    jobs: tuple[int, ...]

    @property
    def jobs_per_pass(self) -> int:
        return len(self.jobs) if self.variant == BATCHED else 1


def resolve_fusion(fusion: str, device: torch.device) -> str:
    """The variant ``fusion`` means on ``device`` (``auto``: batched on CUDA, sequential on CPU)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {', '.join(FUSIONS)}, not {fusion!r}")
    if fusion == AUTO:
        return BATCHED if device.type == "cuda" else SEQUENTIAL
    return fusion


def fusion_key(job: TrainJob) -> tuple | None:
    """Jobs with equal keys can share a fused pass; None for a job that must train alone.

    Row blocks must be equally tall (batch size) and the wrapped modules and scaling the same;
    LoRA dropout would need a per-job random stream to match a job trained alone, so only
    dropout-free jobs of an objective that can fuse (SFT) do. A warm start brings its own config.
    """
    if not training_for(job.objective).fusable:
        return None
    if job.warm_start_from is not None:
        config = json.loads((Path(job.warm_start_from) / "adapter_config.json").read_text())
        r, alpha, dropout, targets = config["r"], config["lora_alpha"], config.get("lora_dropout", 0), config["target_modules"]
    else:
        r, alpha, dropout, targets = job.lora.r, job.lora.alpha, job.lora.dropout, job.lora.target_modules
    if dropout:
        return None
    return (r, alpha, tuple(sorted(targets)), job.batch_size, job.max_length)


def plan_training(jobs: Sequence[TrainJob], device: torch.device, fuse: int, fusion: str = AUTO) -> list[TrainingGroup]:
    """Group ``jobs`` into at most ``fuse`` per fused group, each group with its variant, in the
    order they train: shortest step budget first."""
    variant = resolve_fusion(fusion, device)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].steps)
    groups: list[TrainingGroup] = []
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for i in order:
        key = fusion_key(jobs[i]) if variant != SEQUENTIAL and fuse > 1 else None
        if key is None:
            groups.append(TrainingGroup(SEQUENTIAL, (i,)))
        else:
            by_key[key].append(i)
    for members in by_key.values():
        for start in range(0, len(members), fuse):
            chunk = tuple(members[start : start + fuse])
            groups.append(TrainingGroup(variant if len(chunk) > 1 else SEQUENTIAL, chunk))
    return sorted(groups, key=lambda g: (jobs[g.jobs[0]].steps, g.jobs[0]))
