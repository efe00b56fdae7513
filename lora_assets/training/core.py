"""LoRA supervised fine-tuning: one call trains one or many adapters on one loaded base model.

Why one call for many jobs: loading a base model costs seconds to minutes, a LoRA step costs
milliseconds to seconds. A Dagster run that refreshes a hundred users' adapters should pay the load
once. Each job gets a fresh LoRA on the same base (``get_peft_model`` → train → save → ``unload``),
seeded on its own, so a job trains to the same tensors whether it runs alone or in a batch.

The loss covers response tokens only, and the LM head is applied only to those positions: the
head of a 49k-vocabulary model is ~20 % of a forward pass, and prompt positions need no logits.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_assets.lora_spec import LoraSpec
from lora_assets.training.base_models import LoadedBaseModel, load_base_model

IGNORE_INDEX = -100
METADATA_FILE = "lora_assets.json"


class InvalidTrainingData(ValueError):
    """A job's examples cannot be trained on; the message names the job and the example."""


@dataclass(frozen=True)
class Example:
    """One chat-format training example: the model should answer ``prompt`` with ``response``."""

    prompt: str
    response: str
    system: str | None = None  # the mode's instruction, rendered as the chat's system turn
    id: str = ""  # stable id of the record the example came from, for error messages


@dataclass
class TrainJob:
    """Everything needed to train one adapter."""

    name: str  # shown in progress and errors, e.g. "alice/mail_reply"
    train: Sequence[Example]
    output_dir: Path
    eval: Sequence[Example] = ()
    lora: LoraSpec = field(default_factory=LoraSpec)
    max_steps: int | None = 20  # step budget; when None, ``epochs`` decides
    epochs: float = 1.0  # used only when max_steps is None
    batch_size: int = 8
    max_length: int = 128  # tokens per example, prompt truncated from the left first
    learning_rate: float = 1e-3  # high for LoRA, but runs are tens of steps, not thousands
    seed: int = 0
    warm_start_from: Path | None = None  # previous adapter dir to continue from
    objective: str = "sft"  # "sft" on train/eval examples, or "dpo" on pairs/eval_pairs
    pairs: Sequence[Any] = ()  # PreferencePair (lora_assets.training.dpo), for objective "dpo"
    eval_pairs: Sequence[Any] = ()
    beta: float = 0.1  # DPO temperature: how far the policy may move from the reference
    metadata: dict[str, Any] = field(default_factory=dict)  # copied into lora_assets.json


@dataclass
class TrainResult:
    """What one job produced: where the adapter is and how training went."""

    name: str
    output_dir: Path
    base_model: str
    base_model_revision: str
    steps: int
    loss_curve: list[float]
    base_eval_loss: float | None
    adapter_eval_loss: float | None
    train_tokens: int  # supervised (response) tokens seen
    total_tokens: int  # all non-pad tokens processed
    seconds: float
    tokens_per_second: float  # total_tokens / seconds of the training loop
    extra_metrics: dict[str, float] = field(default_factory=dict)  # e.g. DPO accuracy before/after

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


ProgressFn = Callable[[str, int, int, float, float], None]


def print_progress(job: str, step: int, total: int, loss: float, tokens_per_s: float) -> None:
    """Default progress: one line per step on stderr."""
    print(
        f"  [{job}] step {step}/{total} loss {loss:.4f} {tokens_per_s:.0f} tok/s",
        file=sys.stderr,
        flush=True,
    )


# --- tokenization --------------------------------------------------------------------------


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt positions


def tokenize_example(tokenizer, example: Example, max_length: int) -> TokenizedExample:
    """Render with the model's chat template; supervise only the assistant's reply."""
    prompt_ids = chat_prompt_ids(tokenizer, example.prompt, example.system)
    end = tokenizer.eos_token or ""
    response_ids = tokenizer(example.response + end, add_special_tokens=False)["input_ids"]
    # Keep the response (it is what we learn); cut the prompt from the left when too long.
    response_ids = response_ids[: max(max_length // 2, max_length - len(prompt_ids))]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(response_ids) - max_length) :]
    return TokenizedExample(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
    )


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of a chat up to where the assistant starts answering."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def validate_examples(job_name: str, examples: Sequence[Example], split: str) -> None:
    """Raise InvalidTrainingData naming the job and the first bad example."""
    if split == "train" and not examples:
        raise InvalidTrainingData(f"job {job_name!r}: no training examples")
    for i, ex in enumerate(examples):
        where = f"job {job_name!r}: {split} example {i}" + (f" (id={ex.id})" if ex.id else "")
        if not isinstance(ex, Example):
            raise InvalidTrainingData(f"{where}: expected an Example, got {type(ex).__name__}")
        for fld in ("prompt", "response"):
            value = getattr(ex, fld)
            if not isinstance(value, str):
                raise InvalidTrainingData(f"{where}: {fld} must be a string, got {value!r}")
            if not value.strip():
                raise InvalidTrainingData(f"{where}: empty {fld}")
        if ex.system is not None and not isinstance(ex.system, str):
            raise InvalidTrainingData(f"{where}: system must be a string or None")


def make_batches(
    tokenized: Sequence[TokenizedExample], batch_size: int, steps: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """The exact batches a job trains on: epoch-wise seeded shuffles, padded to each batch's longest."""
    return [collate([tokenized[i] for i in idx], pad_id) for idx in batch_order(len(tokenized), batch_size, steps, seed)]


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Item indices of each step: one seeded shuffle per epoch, epochs concatenated."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def collate(items: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item; pads are masked out of attention and loss."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# --- loss ----------------------------------------------------------------------------------


def supervised_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at supervised positions only (LM head applied there alone), their next tokens,
    and the (rows, positions) mask they were taken from."""
    inner = _causal_lm(model)
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return logits, targets[keep], keep


def response_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on supervised positions only."""
    logits, targets, _keep = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction=reduction)


def _causal_lm(model):
    """The transformers CausalLM under a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def eval_loss(model, batches: Sequence[dict[str, torch.Tensor]]) -> float | None:
    """Token-weighted mean response loss over all eval batches."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        total += response_loss(model, batch, reduction="sum").item()
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count if count else None


def eval_batches_for(
    base: LoadedBaseModel, examples: Sequence[Example], batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    tokenized = [tokenize_example(base.tokenizer, ex, max_length) for ex in examples]
    return [
        _to(collate(tokenized[i : i + batch_size], base.tokenizer.pad_token_id), base.device)
        for i in range(0, len(tokenized), batch_size)
    ]


def evaluate_adapter(
    base: LoadedBaseModel, adapter_dir: Path | None, examples: Sequence[Example], max_length: int = 128
) -> float | None:
    """Held-out response loss of ``base`` plus a saved adapter (or the bare base when None)."""
    from peft import PeftModel

    batches = eval_batches_for(base, examples, max_length=max_length)
    if adapter_dir is None:
        return eval_loss(base.model, batches)
    model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
    try:
        return eval_loss(model, batches)
    finally:
        base.model = model.unload()


# --- training ------------------------------------------------------------------------------


def _steps_for(job: TrainJob, n_examples: int) -> int:
    if job.max_steps is not None:
        if job.max_steps < 1:
            raise InvalidTrainingData(f"job {job.name!r}: max_steps must be >= 1")
        return job.max_steps
    return max(1, math.ceil(job.epochs * n_examples / job.batch_size))


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train_adapters(
    jobs: Sequence[TrainJob],
    base_model: str | LoadedBaseModel,
    progress: ProgressFn | None = print_progress,
    home: Path | None = None,
    on_trained: Callable[[TrainJob, Any], None] | None = None,
) -> list[TrainResult]:
    """Train every job's adapter on one loaded base model; write each as a PEFT folder.

    All jobs are validated before any training starts, so a bad job fails the call without
    leaving a half-written adapter anywhere. Each adapter is written to a temporary sibling and
    renamed into place, so ``output_dir`` holds either the previous adapter or the new one.
    """
    from lora_assets.training.dpo import validate_pairs

    for job in jobs:
        if job.objective == "dpo":
            validate_pairs(job.name, job.pairs, "train")
            validate_pairs(job.name, job.eval_pairs, "eval")
        elif job.objective == "sft":
            validate_examples(job.name, job.train, "train")
            validate_examples(job.name, job.eval, "eval")
        else:
            raise InvalidTrainingData(f"job {job.name!r}: unknown objective {job.objective!r}")
        _steps_for(job, len(job.pairs if job.objective == "dpo" else job.train))
    base = base_model if isinstance(base_model, LoadedBaseModel) else load_base_model(base_model, home)
    return [_train_one(job, base, progress, on_trained) for job in jobs]


def _train_one(
    job: TrainJob,
    base: LoadedBaseModel,
    progress: ProgressFn | None,
    on_trained: Callable[[TrainJob, Any], None] | None,
) -> TrainResult:
    from peft import PeftModel, get_peft_model

    objective = _dpo_objective(job, base) if job.objective == "dpo" else _sft_objective(job, base)
    batches, steps = objective.batches, len(objective.batches)
    base_eval, _ = objective.evaluate(base.model)

    torch.manual_seed(job.seed)
    if job.warm_start_from is not None:
        model = PeftModel.from_pretrained(base.model, str(job.warm_start_from), is_trainable=True)
    else:
        model = get_peft_model(base.model, job.lora.to_peft())
    try:
        _, before = objective.evaluate(model)  # a fresh LoRA is the base; a warm start is not
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=job.learning_rate, weight_decay=0.0)
        model.train()
        curve: list[float] = []
        total_tokens = train_tokens = 0
        start = time.perf_counter()
        for step, batch in enumerate(batches, start=1):
            loss = objective.loss(model, step - 1, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
            total_tokens += int(batch["attention_mask"].sum())
            train_tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if progress:
                progress(job.name, step, steps, curve[-1], total_tokens / (time.perf_counter() - start))
        seconds = time.perf_counter() - start
        adapter_eval, after = objective.evaluate(model)
        if on_trained is not None:
            on_trained(job, model)
        result = TrainResult(
            name=job.name,
            output_dir=Path(job.output_dir),
            base_model=base.ref.key,
            base_model_revision=base.ref.revision,
            steps=steps,
            loss_curve=curve,
            base_eval_loss=base_eval,
            adapter_eval_loss=adapter_eval,
            train_tokens=train_tokens,
            total_tokens=total_tokens,
            seconds=seconds,
            tokens_per_second=total_tokens / seconds if seconds else 0.0,
            extra_metrics={**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}},
        )
        _save_adapter(model, job, base, result)
        return result
    finally:
        # Strip the LoRA layers so the next job starts from the untouched base.
        base.model = model.unload()
        base.model.eval()


@dataclass
class _Objective:
    """What a training objective supplies to the shared loop."""

    batches: list[dict[str, torch.Tensor]]  # on the device, one per step
    loss: Callable[[Any, int, dict[str, torch.Tensor]], torch.Tensor]  # (model, step index, batch)
    evaluate: Callable[[Any], tuple[float | None, dict[str, float]]]  # held-out loss, extra metrics


def _sft_objective(job: TrainJob, base: LoadedBaseModel) -> _Objective:
    tok = base.tokenizer
    train_tok = [tokenize_example(tok, ex, job.max_length) for ex in job.train]
    steps = _steps_for(job, len(train_tok))
    batches = [_to(b, base.device) for b in make_batches(train_tok, job.batch_size, steps, job.seed, tok.pad_token_id)]
    eval_batches = eval_batches_for(base, job.eval, job.batch_size, job.max_length)
    return _Objective(
        batches=batches,
        loss=lambda model, _i, batch: response_loss(model, batch),
        evaluate=lambda model: (eval_loss(model, eval_batches), {}),
    )


def _dpo_objective(job: TrainJob, base: LoadedBaseModel) -> _Objective:
    from lora_assets.training.dpo import (
        dpo_loss,
        pair_batch,
        preference_metrics,
        sequence_logps,
    )

    tok = base.tokenizer
    steps = _steps_for(job, len(job.pairs))
    batches = [
        _to(pair_batch(tok, [job.pairs[i] for i in idx], job.max_length), base.device)
        for idx in batch_order(len(job.pairs), job.batch_size, steps, job.seed)
    ]
    eval_batches = [
        _to(pair_batch(tok, job.eval_pairs[i : i + job.batch_size], job.max_length), base.device)
        for i in range(0, len(job.eval_pairs), job.batch_size)
    ]
    with torch.no_grad():  # the reference is the frozen base, before any LoRA is attached
        refs = [sequence_logps(base.model, b) for b in batches]
        eval_refs = [sequence_logps(base.model, b) for b in eval_batches]

    def loss(model, i: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, ref = sequence_logps(model, batch), refs[i]
        n = logps.shape[0] // 2
        return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], job.beta)[0]

    def evaluate(model) -> tuple[float | None, dict[str, float]]:
        metrics = preference_metrics(model, eval_batches, eval_refs, job.beta)
        if metrics is None:
            return None, {}
        return metrics.loss, {"preference_accuracy": metrics.accuracy, "reward_margin": metrics.mean_margin}

    return _Objective(batches=batches, loss=loss, evaluate=evaluate)


def _save_adapter(model, job: TrainJob, base: LoadedBaseModel, result: TrainResult) -> None:
    out = Path(job.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.peft_config["default"].base_model_name_or_path = str(base.ref.path)
        model.save_pretrained(tmp, safe_serialization=True)
        meta = {
            "base_model": base.ref.key,
            "base_model_revision": base.ref.revision,
            "lora": asdict(job.lora),
            "seed": job.seed,
            "learning_rate": job.learning_rate,
            "batch_size": job.batch_size,
            "max_length": job.max_length,
            "warm_start_from": str(job.warm_start_from) if job.warm_start_from else None,
            "metrics": {k: v for k, v in result.to_json().items() if k not in ("output_dir", "name")},
            **job.metadata,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter_metadata(adapter_dir: Path) -> dict[str, Any]:
    """The lora_assets.json written next to a trained adapter."""
    return json.loads((Path(adapter_dir) / METADATA_FILE).read_text())
