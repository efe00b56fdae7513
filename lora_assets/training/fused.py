"""Fused multi-adapter SFT: K users' LoRAs trained together on one frozen base.

mLoRA (arXiv 2312.02515) style. Every target ``nn.Linear`` of the base is wrapped once; for the
rows of job ``j`` it adds ``x @ A[j]^T @ B[j]^T * scaling``. A pass holds the rows of
``jobs_per_pass`` jobs (``variant.py``: one job in turn when interleaved, the whole group when
batched, a ``torch.bmm`` over the jobs' A/B), padded to one width. The loss is the sum of each
job's own mean loss (``block_losses`` of the objective), so the gradient that reaches
``A[j]``/``B[j]`` is exactly job ``j``'s; each job keeps its own AdamW state.

Dtypes as in peft's own LoRA layer: the LoRA weights (and so AdamW's moments) stay fp32 on a
bf16/fp16 base, the activations are cast to fp32 for the LoRA product, and the sum is cast back
to the base layer's dtype.

What stays per job, so that a fused job trains to the same tensors as alone (up to reduction
order): its seed (peft itself initialises the LoRA, under the job's seed), its batches (the
objective's own seeded shuffle), its step budget, its learning rate and optimizer. A job that has
used its budget leaves the group at once: it is evaluated, saved through peft (a standard PEFT
folder) and handed to ``on_saved`` while the others go on, so a small user never waits for a
large one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.early_stopping import EarlyStopping
from lora_assets.training.jobs import ProgressFn, TrainJob, TrainResult
from lora_assets.training.objectives import Prepared, training_for
from lora_assets.training.text import causal_lm, pad_batch, supervised_tokens

SaveFn = Callable[[Any, TrainJob, TrainResult], None]


class FusedLora(torch.nn.Module):
    """A frozen ``nn.Linear`` plus one LoRA per job; ``active`` says whose rows the batch holds."""

    def __init__(self, base_layer: torch.nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scaling = scaling
        self.lora_a: list[torch.Tensor | None] = []  # per job, (r, in_features), fp32
        self.lora_b: list[torch.Tensor | None] = []  # per job, (out_features, r), fp32
        self.active: list[int] = []  # job index of each equal-sized row block, in batch order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.active:
            return out
        x = x.to(self.lora_a[self.active[0]].dtype)  # as peft: the LoRA product in the LoRA's dtype
        if len(self.active) == 1:  # one job's rows: the same two GEMMs peft's LoRA layer runs
            j = self.active[0]
            delta = F.linear(F.linear(x, self.lora_a[j]), self.lora_b[j])
        else:
            rows = x.reshape(len(self.active), -1, x.shape[-1])  # (jobs, rows * positions, in)
            a = torch.stack([self.lora_a[j] for j in self.active]).transpose(1, 2)
            b = torch.stack([self.lora_b[j] for j in self.active]).transpose(1, 2)
            delta = torch.bmm(torch.bmm(rows, a), b).reshape(*out.shape[:-1], -1)
        return (out + delta * self.scaling).to(out.dtype)


@dataclass
class _Job:
    job: TrainJob
    prepared: Prepared  # the objective's batches (one per step) and held-out measure
    steps: int
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    curve: list[float]
    stopping: EarlyStopping | None = None
    total_tokens: int = 0
    train_tokens: int = 0


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


class _Wrapped:
    """The base's target linears wrapped in ``FusedLora``; taken out while peft needs the base."""

    def __init__(self, base: LoadedBaseModel, names: Sequence[str], scaling: float) -> None:
        self.base = base
        model = causal_lm(base.model)
        self.layers = {name: FusedLora(model.get_submodule(name), scaling) for name in names}
        self.installed = False

    def _set(self, wrapped: bool) -> None:
        model = causal_lm(self.base.model)
        for name, layer in self.layers.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, layer if wrapped else layer.base_layer)
        self.installed = wrapped

    def install(self) -> None:
        self._set(True)

    def uninstall(self) -> None:
        if self.installed:
            self._set(False)

    def activate(self, jobs_in_batch: list[int]) -> None:
        for layer in self.layers.values():
            layer.active = jobs_in_batch


def train_fused(
    jobs: Sequence[TrainJob],
    base: LoadedBaseModel,
    progress: ProgressFn | None,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: SaveFn,
    jobs_per_pass: int,
    on_saved: Callable[[TrainJob, TrainResult], None] | None = None,
) -> list[TrainResult]:
    """Train SFT jobs that share a LoRA signature as one group, ``jobs_per_pass`` jobs per pass.

    Each job is finished as soon as its own budget is spent: evaluated on its held-out set,
    ``on_trained(job, peft_model)``, ``save(peft_model, job, result)``, then ``on_saved(job,
    result)`` with the base model free (no fused layers in it), so the caller can gate and
    publish before the rest of the group trains on.
    """
    starts = [_initial_lora(base, job) for job in jobs]
    names = sorted(starts[0][0])
    if any(sorted(s[0]) != names or s[1] != starts[0][1] for s in starts):
        raise ValueError("fused jobs must share target modules and LoRA scaling")
    state: list[_Job] = []
    base_losses: list[float | None] = []
    wrapped = _Wrapped(base, names, starts[0][1])
    for job, (weights, _scaling) in zip(jobs, starts):
        prepared = training_for(job.objective).prepare(job, base)
        base_losses.append(prepared.evaluate(base.model)[0])
        params = []
        for name in names:
            a, b = (w.clone().requires_grad_(True) for w in weights[name])
            wrapped.layers[name].lora_a.append(a)
            wrapped.layers[name].lora_b.append(b)
            params.extend([a, b])
        optimizer, schedule = job.to_optimizer(params)
        state.append(_Job(job, prepared, len(prepared.batches), optimizer, schedule, curve=[]))
        state[-1].stopping = _stopping(len(state) - 1, state[-1], base, wrapped)
    block_losses = training_for(jobs[0].objective).block_losses
    results: dict[int, TrainResult] = {}
    clock = 0.0  # seconds spent in the group's passes (not in finishing its jobs)
    group_tokens = 0
    wrapped.install()
    try:
        base.model.train()
        for step in range(max(s.steps for s in state)):
            active = [j for j, s in enumerate(state) if step < s.steps]
            start = time.perf_counter()
            for first in range(0, len(active), jobs_per_pass):
                chunk = active[first : first + jobs_per_pass]
                losses = _pass(state, base, wrapped, block_losses, chunk, step)
                for j, loss in zip(chunk, losses.tolist()):
                    s = state[j]
                    s.optimizer.step()
                    s.schedule.step()
                    s.optimizer.zero_grad(set_to_none=True)
                    s.curve.append(loss)
                    batch = s.prepared.batches[step]
                    tokens = int(batch["attention_mask"].sum())
                    s.total_tokens += tokens
                    s.train_tokens += supervised_tokens(batch)
                    group_tokens += tokens
            clock += time.perf_counter() - start
            if progress:
                for j in active:
                    progress(state[j].job.name, step + 1, state[j].steps, state[j].curve[-1], group_tokens / clock)
            for j in active:
                if state[j].stopping.after_step(step + 1):
                    state[j].steps = step + 1  # validation stopped improving: it leaves the group now
            for j in (j for j in active if step + 1 == state[j].steps):
                results[j] = _finish(j, state, base, base_losses[j], wrapped, clock, group_tokens, on_trained, save)
                if on_saved is not None:
                    on_saved(state[j].job, results[j])
                if len(results) < len(state):
                    wrapped.install()
                    base.model.train()
    finally:
        wrapped.uninstall()
        base.model.eval()
    return [results[j] for j in range(len(state))]


def _stopping(j: int, s: _Job, base: LoadedBaseModel, wrapped: _Wrapped) -> EarlyStopping:
    """Job ``j``'s early stopping on its own rows of the fused layers."""

    def validate() -> float | None:
        wrapped.activate([j])
        return s.prepared.validate(base.model)

    def snapshot() -> list[torch.Tensor]:
        return [w[j].detach().clone() for layer in wrapped.layers.values() for w in (layer.lora_a, layer.lora_b)]

    def restore(best: list[torch.Tensor]) -> None:
        mine = [w[j] for layer in wrapped.layers.values() for w in (layer.lora_a, layer.lora_b)]
        with torch.no_grad():
            for t, b in zip(mine, best):
                t.copy_(b)

    return EarlyStopping(s.job, validate, snapshot, restore)


def _pass(state: list[_Job], base: LoadedBaseModel, wrapped: _Wrapped, block_losses, chunk: list[int], step: int) -> torch.Tensor:
    """Forward and backward of some jobs' rows together; each job's own mean loss."""
    parts = [state[j].prepared.batches[step] for j in chunk]
    width = max(p["input_ids"].shape[1] for p in parts)
    pad_id = base.tokenizer.pad_token_id
    batch = {k: torch.cat([pad_batch(p, width, pad_id)[k] for p in parts]) for k in parts[0]}
    wrapped.activate(chunk)
    losses = block_losses(base.model, batch, len(chunk))
    losses.sum().backward()
    return losses.detach()


def _finish(
    j: int,
    state: list[_Job],
    base: LoadedBaseModel,
    base_loss: float | None,
    wrapped: _Wrapped,
    clock: float,
    group_tokens: int,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: SaveFn,
) -> TrainResult:
    """Evaluate job ``j``, take it out of the group and save it through peft."""
    s = state[j]
    s.stopping.finish()
    wrapped.activate([j])
    adapter_loss, extra = s.prepared.evaluate(base.model)
    weights = {}
    for name, layer in wrapped.layers.items():
        weights[name] = (layer.lora_a[j].detach(), layer.lora_b[j].detach())
        layer.lora_a[j] = layer.lora_b[j] = None  # its memory goes with it
    wrapped.activate([])
    wrapped.uninstall()
    result = TrainResult(
        name=s.job.name,
        output_dir=s.job.output_dir,
        base_model=base.ref.key,
        base_model_revision=base.ref.revision,
        steps=len(s.curve),
        loss_curve=s.curve,
        base_eval_loss=base_loss,
        adapter_eval_loss=adapter_loss,
        train_tokens=s.train_tokens,
        total_tokens=s.total_tokens,
        seconds=None,  # it shared every pass: no wall time of its own was measured
        tokens_per_second=None,
        extra_metrics=extra,
        fused_with=len(state),
        group_seconds=clock,
        group_tokens_per_second=group_tokens / clock if clock else 0.0,
        **s.stopping.record(),
    )
    s.optimizer, s.schedule, s.prepared = None, None, None  # type: ignore[assignment]
    _save_through_peft(base, s.job, weights, result, on_trained, save)
    return result


def _save_through_peft(
    base: LoadedBaseModel,
    job: TrainJob,
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]],
    result: TrainResult,
    on_trained: Callable[[TrainJob, Any], None] | None,
    save: SaveFn,
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
