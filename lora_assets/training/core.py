"""LoRA training: one call trains one or many adapters on one loaded base model.

Why one call for many jobs: loading a base model costs seconds to minutes, a LoRA step costs
milliseconds to seconds. A Dagster run that refreshes a hundred users' adapters should pay the load
once. How the jobs train is resolved once per call (``training/variant.py``): on a GPU, jobs
that can share a forward/backward pass (SFT with the same LoRA shape) are trained *fused*, up
to ``fuse`` per group (``training/fused.py``); the others (DPO), and every job on a CPU, one
after another, each with a fresh peft LoRA on the same base (``get_peft_model`` -> train ->
save -> ``unload``). Every job is seeded on its own, so it trains to the same tensors alone or
in a batch (exactly when sequential, up to reduction order when fused).

The loss covers response tokens only, and the LM head is applied only to those positions: the
head of a 49k-vocabulary model is ~20 % of a forward pass, and prompt positions need no logits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from lora_assets.paths import moved_aside, staging_prefix
from lora_assets.training.base_models import LoadedBaseModel, load_base_model
from lora_assets.training.early_stopping import EarlyStopping
from lora_assets.training.fused import train_fused
from lora_assets.training.gguf_lora import GGUF_FILE, GGUF_TYPES, gguf_architecture, write_gguf_adapter
from lora_assets.training.jobs import (
    ChosenStep,
    InvalidTrainingData,
    ProgressFn,
    TrainJob,
    TrainResult,
    print_progress,
)
from lora_assets.training.objectives import attached, training_for
from lora_assets.training.text import (
    Example,
    eval_batches_for,
    eval_loss,
    supervised_tokens,
)
from lora_assets.training.variant import AUTO, SEQUENTIAL, plan_training

METADATA_FILE = "lora_assets.json"
DEFAULT_FUSE = 8  # jobs per fused group (where the variant fuses: batched on a GPU by default)
_STORED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def validate_job(job: TrainJob) -> None:
    """Raise InvalidTrainingData naming the job and the first example that cannot be trained on."""
    training_for(job.objective).validate(job)
    _ = job.steps
    if job.peft_dtype not in _STORED_DTYPES:
        raise InvalidTrainingData(f"job {job.name!r}: peft_dtype {job.peft_dtype!r} is not one of {', '.join(_STORED_DTYPES)}")
    if job.gguf_type and job.gguf_type not in GGUF_TYPES:
        raise InvalidTrainingData(f"job {job.name!r}: gguf_type {job.gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")


def train_adapters(
    jobs: Sequence[TrainJob],
    base_model: str | LoadedBaseModel,
    progress: ProgressFn | None = print_progress,
    home: Path | None = None,
    on_trained: Callable[[TrainJob, Any], None] | None = None,
    fuse: int = DEFAULT_FUSE,
    on_saved: Callable[[TrainJob, TrainResult], None] | None = None,
    fusion: str = AUTO,
) -> list[TrainResult]:
    """Train every job's adapter on one loaded base model; write each as a PEFT folder.

    All jobs are validated before any training starts, so a bad job fails the call without
    leaving a half-written adapter anywhere. Each adapter is written to a temporary sibling and
    renamed into place, so ``output_dir`` holds either the previous adapter or the new one.
    How the jobs train is planned once (``variant.plan_training``): ``fusion`` (``auto``,
    ``sequential``, ``interleaved``, ``batched``) on the base's device, at most ``fuse`` jobs per
    fused group, shortest budget first. ``on_saved(job, result)`` is called as soon as each
    adapter is on disk and the base model is free again, also in the middle of a fused group, so
    a caller can evaluate, publish and report while the rest trains. A job that ``refits``
    (``StepBudget.refit``) trains twice: a validation pass chooses its steps, then the call's
    refits train on every example for theirs; callbacks hear of the refit only.
    """
    for job in jobs:
        validate_job(job)
    base = base_model if isinstance(base_model, LoadedBaseModel) else load_base_model(base_model, home)
    # A job that refits first trains a pass that only chooses its steps: nothing of it is written,
    # no callback hears of it, and it scores no held-out set (the refit is what the gate judges);
    # then every example trains for those steps.
    passes = [replace(job, eval=()) if job.refits else job for job in jobs]
    choosing = {id(first) for job, first in zip(jobs, passes) if job.refits}

    def told(callback):
        return callback and (lambda job, x: None if id(job) in choosing else callback(job, x))

    results = _train_groups(passes, base, progress, told(on_trained), fuse, told(on_saved), fusion, choosing)
    refits = {i: job.refitted(_chosen(results[i])) for i, job in enumerate(jobs) if job.refits}
    if refits:
        original = {id(refit): jobs[i] for i, refit in refits.items()}  # callers know their own jobs

        def as_theirs(callback):
            return callback and (lambda job, x: callback(original[id(job)], x))

        refitted = _train_groups(list(refits.values()), base, progress, as_theirs(on_trained), fuse,
                                 as_theirs(on_saved), fusion)
        results.update({i: refitted[k] for k, i in enumerate(refits)})
    return [results[i] for i in range(len(jobs))]


def _chosen(result: TrainResult) -> ChosenStep:
    return ChosenStep(best_step=result.best_step or result.steps, validation_curve=result.validation_curve,
                      validation_loss=result.validation_loss, steps=result.steps)


def _train_groups(
    jobs: Sequence[TrainJob],
    base: LoadedBaseModel,
    progress: ProgressFn | None,
    on_trained: Callable[[TrainJob, Any], None] | None,
    fuse: int,
    on_saved: Callable[[TrainJob, TrainResult], None] | None,
    fusion: str,
    unsaved: set[int] = frozenset(),
) -> dict[int, TrainResult]:
    """Train ``jobs`` as planned (``variant.plan_training``), writing none whose id is in
    ``unsaved``: index -> result."""

    def save(model, job: TrainJob, result: TrainResult) -> None:
        if id(job) not in unsaved:
            _save_adapter(model, job, base, result)

    results: dict[int, TrainResult] = {}
    for group in plan_training(jobs, base.device, fuse, fusion):
        if group.variant == SEQUENTIAL:
            (i,) = group.jobs
            results[i] = _train_one(jobs[i], base, progress, on_trained, save)
            if on_saved is not None:
                on_saved(jobs[i], results[i])
            continue
        fused = train_fused(
            [jobs[i] for i in group.jobs], base, progress, on_trained, save,
            jobs_per_pass=group.jobs_per_pass, on_saved=on_saved,
        )
        results.update(zip(group.jobs, fused))
    return results


def _train_one(
    job: TrainJob,
    base: LoadedBaseModel,
    progress: ProgressFn | None,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: Callable[[Any, TrainJob, TrainResult], None],
) -> TrainResult:
    from lora_assets.training.peft_models import new_lora, saved_lora

    prepared = training_for(job.objective).prepare(job, base)
    batches, steps = prepared.batches, len(prepared.batches)
    base_eval, _ = prepared.evaluate(base.model)

    torch.manual_seed(job.seed)
    if job.warm_start_from is not None:
        model = saved_lora(base.model, job.warm_start_from, trainable=True)
    else:
        model = new_lora(base.model, job.lora.to_peft())
    try:
        # A fresh LoRA is the base; a warm start is not, and DPO reports where it started.
        before = prepared.evaluate(model)[1] if prepared.metrics_before_training else {}
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, schedule = job.to_optimizer(params)
        stopping = EarlyStopping(
            job, lambda: prepared.validate(model),
            snapshot=lambda: [p.detach().clone() for p in params],
            restore=lambda best: [p.data.copy_(b) for p, b in zip(params, best)],
        )
        model.train()
        curve: list[float] = []
        total_tokens = train_tokens = 0
        start = time.perf_counter()
        for step, batch in enumerate(batches, start=1):
            loss = prepared.loss(model, step - 1, batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
            total_tokens += int(batch["attention_mask"].sum())
            train_tokens += supervised_tokens(batch)
            if progress:
                progress(job.name, step, steps, curve[-1], total_tokens / (time.perf_counter() - start))
            if stopping.after_step(step):
                break
        stopping.finish()
        seconds = time.perf_counter() - start
        adapter_eval, after = prepared.evaluate(model)
        if on_trained is not None:
            on_trained(job, model)
        result = TrainResult(
            name=job.name,
            output_dir=Path(job.output_dir),
            base_model=base.ref.key,
            base_model_revision=base.ref.revision,
            steps=len(curve),
            loss_curve=curve,
            base_eval_loss=base_eval,
            adapter_eval_loss=adapter_eval,
            train_tokens=train_tokens,
            total_tokens=total_tokens,
            seconds=seconds,
            tokens_per_second=total_tokens / seconds if seconds else 0.0,
            extra_metrics={**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}},
            **stopping.record(),
        )
        save(model, job, result)
        return result
    finally:
        # Strip the LoRA layers so the next job starts from the untouched base.
        base.model = model.unload()
        base.model.eval()


def _save_adapter(model, job: TrainJob, base: LoadedBaseModel, result: TrainResult) -> None:
    out = Path(job.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
    try:
        model.peft_config["default"].base_model_name_or_path = str(base.ref.path)
        model.save_pretrained(tmp, safe_serialization=True)
        _cast_saved(tmp, job.peft_dtype)
        device_files = _write_device_files(tmp, job, base)
        meta = {
            "base_model": base.ref.key,
            "base_model_revision": base.ref.revision,
            "objective": job.objective.name,
            "lora": asdict(job.lora),
            "seed": job.seed,
            "learning_rate": job.learning_rate,
            "decay_to": job.decay_to,
            "batch_size": job.batch_size,
            "max_length": job.max_length,
            "warm_start_from": str(job.warm_start_from) if job.warm_start_from else None,
            "metrics": {k: v for k, v in result.to_json().items() if k not in ("output_dir", "name")},
            "device_files": device_files,
            **job.metadata,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
        old = None
        if out.exists():
            old = moved_aside(out)
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cast_saved(folder: Path, dtype: str) -> None:
    """Store the adapter's tensors as ``dtype``: half the bytes of fp32 on every drive and
    device, for a held-out loss change measured by ``benchmarks/device.py``. The trained (fp32)
    tensors are what the gate evaluated; a warm start loads the stored ones back into fp32."""
    from safetensors.torch import load_file, save_file

    if dtype == "fp32":
        return
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.to(_STORED_DTYPES[dtype]) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_device_files(folder: Path, job: TrainJob, base: LoadedBaseModel) -> dict[str, str]:
    """``adapter.gguf`` from the PEFT files just saved (the same weights, the same run), so a device
    running llama.cpp on the quantized base gets the adapter without converting anything.
    Returns {file: type}; empty when the job asks for none or the base has no GGUF form."""
    base_config = base.model.config.to_dict()
    if not job.gguf_type or gguf_architecture(base_config) is None:
        return {}
    write_gguf_adapter(folder, base_config, folder / GGUF_FILE, job.gguf_type)
    return {GGUF_FILE: job.gguf_type}


def evaluate_adapter(
    base: LoadedBaseModel, adapter_dir: Path | None, examples: Sequence[Example], max_length: int = 128
) -> float | None:
    """Held-out response loss of ``base`` plus a saved adapter (or the bare base when None)."""
    batches = eval_batches_for(base.tokenizer, base.device, examples, max_length=max_length)
    if adapter_dir is None:
        return eval_loss(base.model, batches)
    with attached(base, adapter_dir) as model:
        return eval_loss(model, batches)


def read_adapter_metadata(adapter_dir: Path) -> dict[str, Any]:
    """The lora_assets.json written next to a trained adapter."""
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text())


__all__ = [
    "DEFAULT_FUSE",
    "Example",
    "InvalidTrainingData",
    "TrainJob",
    "TrainResult",
    "evaluate_adapter",
    "read_adapter_metadata",
    "train_adapters",
    "validate_job",
]
