"""Fused multi-adapter SFT: K users' LoRAs trained together, one pass through the frozen base.

mLoRA (arXiv 2312.02515) style. Each step's batch stacks the rows of every job still training
(``batch_size`` rows each, padded to one width). Every target ``nn.Linear`` of the base is
wrapped once; for the rows of job ``j`` it adds ``x @ A[j]^T @ B[j]^T * scaling`` (a batched
matmul over the jobs), so the base GEMMs see K times more rows while each job's rows only ever
touch its own A/B. The loss is the sum of each job's mean response loss, so the gradient that
reaches ``A[j]``/``B[j]`` is exactly job ``j``'s own; each job keeps its own AdamW state.

What stays per job, so that a fused job trains to the same tensors as alone (up to fp32
reduction order): its seed (the LoRA is initialised by peft itself, under the job's seed), its
batches (its own seeded shuffle), its step budget (a job that is done leaves the batch), its
learning rate and optimizer. The adapters are saved through peft, as standard PEFT folders.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.jobs import ProgressFn, TrainJob, TrainResult
from lora_assets.training.text import (
    causal_lm,
    eval_batches_for,
    eval_loss,
    make_batches,
    pad_batch,
    supervised_logits,
    supervised_tokens,
    to_device,
    tokenize_example,
)


CPU_JOBS_PER_PASS = 1  # on 2 CPU cores one job's 8x128 tokens already fill the GEMMs (~70 % of peak)


class FusedLora(torch.nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA per job; ``active`` says whose rows the batch holds."""

    def __init__(self, base_layer: torch.nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.lora_a: list[torch.Tensor] = []  # per job, (r, in_features)
        self.lora_b: list[torch.Tensor] = []  # per job, (out_features, r)
        self.active: list[int] = []  # job index of each equal-sized row block, in batch order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.active:
            return out
        if len(self.active) == 1:  # one job's rows: the same two GEMMs peft's LoRA layer runs
            j = self.active[0]
            return out + F.linear(F.linear(x, self.lora_a[j]), self.lora_b[j]) * self.scaling
        rows = x.reshape(len(self.active), -1, x.shape[-1])  # (jobs, rows * positions, in)
        a = torch.stack([self.lora_a[j] for j in self.active]).transpose(1, 2)
        b = torch.stack([self.lora_b[j] for j in self.active]).transpose(1, 2)
        delta = torch.bmm(torch.bmm(rows, a), b)
        return out + delta.reshape(out.shape) * self.scaling


@dataclass
class _Job:
    job: TrainJob
    batches: list[dict[str, torch.Tensor]]  # on the device, one per step, own padding
    held_out: list[dict[str, torch.Tensor]]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    curve: list[float] | None = None
    total_tokens: int = 0
    train_tokens: int = 0


def fusion_key(job: TrainJob) -> tuple | None:
    """Jobs with equal keys can share a fused pass; None for a job that must train alone.

    Row blocks must be equally tall (batch size) and the wrapped modules and scaling the same;
    LoRA dropout would need a per-job random stream to match a job trained alone, so only
    dropout-free SFT jobs fuse (every shipped mode). A warm start brings its own LoRA config.
    """
    if job.objective.pairwise:
        return None
    if job.warm_start_from is not None:
        config = json.loads((Path(job.warm_start_from) / "adapter_config.json").read_text())
        r, alpha, dropout, targets = config["r"], config["lora_alpha"], config.get("lora_dropout", 0), config["target_modules"]
    else:
        r, alpha, dropout, targets = job.lora.r, job.lora.alpha, job.lora.dropout, job.lora.target_modules
    if dropout:
        return None
    return (r, alpha, tuple(sorted(targets)), job.batch_size, job.max_length)


def _initial_lora(base: LoadedBaseModel, job: TrainJob) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """The job's starting A/B per module, made by peft exactly as the sequential path makes them."""
    from lora_assets.training.peft_models import new_lora, saved_lora
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(job.seed)
    if job.warm_start_from is not None:
        model = saved_lora(base.model, job.warm_start_from, trainable=True)
    else:
        model = new_lora(base.model, job.lora.to_peft())
    try:
        weights, scaling = {}, None
        for name, module in causal_lm(model).named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                weights[name] = (
                    module.lora_A["default"].weight.detach().clone(),
                    module.lora_B["default"].weight.detach().clone(),
                )
                scaling = module.scaling["default"]
        return weights, float(scaling)
    finally:
        base.model = model.unload()


def _install(model, names: Sequence[str], scaling: float) -> dict[str, FusedLora]:
    wrappers = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrappers[name] = FusedLora(getattr(parent, attr), scaling)
        setattr(parent, attr, wrappers[name])
    return wrappers


def _uninstall(model, wrappers: dict[str, FusedLora]) -> None:
    for name, wrapper in wrappers.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, wrapper.base_layer)


def train_fused(
    jobs: Sequence[TrainJob],
    base: LoadedBaseModel,
    progress: ProgressFn | None,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: Callable[[Any, TrainJob, TrainResult], None],
    jobs_per_pass: int | None = None,
) -> list[TrainResult]:
    """Train SFT jobs that share a LoRA signature together; ``save(peft_model, job, result)``.

    ``jobs_per_pass``: how many jobs' rows share one forward/backward (default: all of them on
    a GPU, ``CPU_JOBS_PER_PASS`` on a CPU).
    """
    if jobs_per_pass is None:
        jobs_per_pass = len(jobs) if base.device.type == "cuda" else CPU_JOBS_PER_PASS
    tok = base.tokenizer
    starts = [_initial_lora(base, job) for job in jobs]
    names = sorted(starts[0][0])
    if any(sorted(s[0]) != names or s[1] != starts[0][1] for s in starts):
        raise ValueError("fused jobs must share target modules and LoRA scaling")
    state: list[_Job] = []
    for job in jobs:
        tokenized = [tokenize_example(tok, ex, job.max_length) for ex in job.train]
        batches = make_batches(tokenized, job.batch_size, job.steps, job.seed, tok.pad_token_id)
        held_out = eval_batches_for(tok, base.device, job.eval, job.batch_size, job.max_length)
        state.append(_Job(job, [to_device(b, base.device) for b in batches], held_out, params=[]))
    base_losses = [eval_loss(base.model, s.held_out) for s in state]

    model = causal_lm(base.model)
    wrappers = _install(model, names, starts[0][1])
    try:
        for s, (weights, _scaling) in zip(state, starts):
            for name in names:
                a, b = (w.clone().requires_grad_(True) for w in weights[name])
                wrappers[name].lora_a.append(a)
                wrappers[name].lora_b.append(b)
                s.params.extend([a, b])
            s.optimizer = torch.optim.AdamW(s.params, lr=s.job.learning_rate, weight_decay=0.0)
            s.curve = []

        def activate(jobs_in_batch: list[int]) -> None:
            for w in wrappers.values():
                w.active = jobs_in_batch

        base.model.train()
        seconds = _loop(state, base, activate, progress, jobs_per_pass)
        base.model.eval()
        group_tokens = sum(s.total_tokens for s in state) or 1
        results = []
        for j, s in enumerate(state):
            activate([j])
            adapter_loss = eval_loss(base.model, s.held_out)
            share = seconds * s.total_tokens / group_tokens
            results.append(
                TrainResult(
                    name=s.job.name,
                    output_dir=s.job.output_dir,
                    base_model=base.ref.key,
                    base_model_revision=base.ref.revision,
                    steps=len(s.batches),
                    loss_curve=s.curve,
                    base_eval_loss=base_losses[j],
                    adapter_eval_loss=adapter_loss,
                    train_tokens=s.train_tokens,
                    total_tokens=s.total_tokens,
                    seconds=share,
                    tokens_per_second=s.total_tokens / share if share else 0.0,
                    fused_with=len(state),
                )
            )
        trained = [[(w.lora_a[j].detach(), w.lora_b[j].detach()) for w in wrappers.values()] for j in range(len(state))]
    finally:
        _uninstall(model, wrappers)
    for s, result, weights in zip(state, results, trained):
        _save_through_peft(base, s.job, dict(zip(wrappers, weights)), result, on_trained, save)
    return results


def _loop(
    state: list[_Job], base: LoadedBaseModel, activate, progress: ProgressFn | None, jobs_per_pass: int
) -> float:
    """The fused steps: every job still within its budget contributes its next batch.

    A step's rows go through the model ``jobs_per_pass`` jobs at a time; a job's gradient comes
    from its own rows only, so its optimizer steps right after its pass. One pass for all K is
    what a GPU wants; on a CPU, one job's 8 x 128 tokens already fill the GEMMs, and bigger
    passes only re-fault gigabytes of activations.
    """
    pad_id = base.tokenizer.pad_token_id
    start = time.perf_counter()
    done_tokens = 0
    for step in range(max(len(s.batches) for s in state)):
        active = [j for j, s in enumerate(state) if step < len(s.batches)]
        for first in range(0, len(active), jobs_per_pass):
            chunk = active[first : first + jobs_per_pass]
            losses = _pass(state, base, activate, chunk, step, pad_id)
            for j, loss in zip(chunk, losses.tolist()):
                s = state[j]
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                s.curve.append(loss)
                tokens = int(s.batches[step]["attention_mask"].sum())
                s.total_tokens += tokens
                s.train_tokens += supervised_tokens(s.batches[step])
                done_tokens += tokens
        if progress:
            rate = done_tokens / (time.perf_counter() - start)
            for j in active:
                progress(state[j].job.name, step + 1, len(state[j].batches), state[j].curve[-1], rate)
    return time.perf_counter() - start


def _pass(state: list[_Job], base: LoadedBaseModel, activate, chunk: list[int], step: int, pad_id: int) -> torch.Tensor:
    """Forward and backward of some jobs' rows together; each job's mean response loss."""
    parts = [state[j].batches[step] for j in chunk]
    width = max(p["input_ids"].shape[1] for p in parts)
    batch = {k: torch.cat([pad_batch(p, width, pad_id)[k] for p in parts]) for k in parts[0]}
    activate(chunk)
    logits, targets, keep = supervised_logits(base.model, batch)
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    slot = rows // state[chunk[0]].job.batch_size
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    sums = torch.zeros(len(chunk), device=logits.device).index_add(0, slot, token_loss)
    counts = torch.zeros(len(chunk), device=logits.device).index_add(0, slot, torch.ones_like(token_loss))
    losses = sums / counts
    losses.sum().backward()
    return losses.detach()


def _save_through_peft(
    base: LoadedBaseModel,
    job: TrainJob,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    result: TrainResult,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: Callable[[Any, TrainJob, TrainResult], None],
) -> None:
    """Load the trained A/B into a peft model of the job's config and save it the standard way."""
    from lora_assets.training.peft_models import new_lora, saved_lora

    if job.warm_start_from is not None:
        model = saved_lora(base.model, job.warm_start_from, trainable=False)
    else:
        model = new_lora(base.model, job.lora.to_peft())
    try:
        inner = causal_lm(model)
        with torch.no_grad():
            for name, (a, b) in weights.items():
                module = inner.get_submodule(name)
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
        model.eval()
        if on_trained is not None:
            on_trained(job, model)
        save(model, job, result)
    finally:
        base.model = model.unload()
        base.model.eval()
