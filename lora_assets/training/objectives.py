"""How each objective declared in ``lora_assets.objective`` is trained and measured.

The shared loop in ``core`` asks an objective for its step batches, its loss on one batch and
its held-out measure; the eval gate asks it to measure a saved adapter the same way. One place
per objective, instead of branching on its name wherever training happens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_assets.objective import DPO, SFT, Objective
from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.dpo import (
    PreferencePair,
    dpo_loss,
    pair_batch,
    pair_batches,
    preference_metrics,
    sequence_logps,
    validate_pairs,
)
from lora_assets.training.jobs import TrainJob, validate_examples
from lora_assets.training.retrieval import Retriever, tokenize_retrieved
from lora_assets.training.text import (
    Example,
    batch_order,
    collate_in_order,
    eval_batches_for,
    eval_loss,
    example_losses,
    make_batches,
    response_loss,
    response_loss_per_block,
    to_device,
    tokenize_example,
)

Batch = dict[str, torch.Tensor]


@dataclass
class Prepared:
    """One job's training data, ready for the shared loop."""

    batches: list[Batch]  # on the device, one per step
    loss: Callable[[Any, int, Batch], torch.Tensor]  # (model, step index, batch) -> loss
    evaluate: Callable[[Any], tuple[float | None, dict[str, float]]]  # held-out loss, extra metrics
    metrics_before_training: bool  # whether `evaluate` before training tells more than the base loss
    validate: Callable[[Any], float | None]  # the same measure on the validation slice (None: no slice)


@dataclass(frozen=True)
class Scores:
    """One model's loss on each held-out example, for paired comparisons on the same examples:
    ``losses[i]`` summed over ``weights[i]`` scored units (response tokens; 1 for a DPO pair)."""

    losses: list[float]
    weights: list[int]

    @property
    def mean(self) -> float | None:
        """The held-out loss as training reports it (unit-weighted mean)."""
        total = sum(self.weights)
        return sum(self.losses) / total if total else None


def _scored(base: LoadedBaseModel, adapter_dir: Path | None, score: Callable[[Any], Any]) -> Any:
    if adapter_dir is None:
        return score(base.model)
    with attached(base, adapter_dir) as model:
        return score(model)


class SftTraining:
    """Next-token loss on response tokens; held-out measure: the same loss on the eval split."""

    retrieval = True  # the retrieval baseline applies: examples are texts a prompt can show

    # Each row's loss depends on that row alone, so several jobs' batches can share a pass:
    # ``block_losses(model, batch, k)`` gives each of k stacked batches its own mean loss.
    fusable = True
    block_losses = staticmethod(response_loss_per_block)

    def validate(self, job: TrainJob) -> None:
        validate_examples(job.name, job.train, "train", Example, ("prompt", "response"))
        validate_examples(job.name, job.eval, "eval", Example, ("prompt", "response"))
        validate_examples(job.name, job.validation, "validation", Example, ("prompt", "response"))

    def prepare(self, job: TrainJob, base: LoadedBaseModel) -> Prepared:
        tok = base.tokenizer
        tokenized = [tokenize_example(tok, ex, job.max_length) for ex in job.train]
        batches = [to_device(b, base.device) for b in make_batches(tokenized, job.batch_size, job.steps, job.seed, tok.pad_token_id)]
        held_out = eval_batches_for(tok, base.device, job.eval, job.batch_size, job.max_length)
        validation = eval_batches_for(tok, base.device, job.validation, job.batch_size, job.max_length)
        return Prepared(
            batches=batches,
            loss=lambda model, _i, batch: response_loss(model, batch),
            evaluate=lambda model: (eval_loss(model, held_out), {}),
            metrics_before_training=False,
            validate=lambda model: eval_loss(model, validation),
        )

    def scores(self, base: LoadedBaseModel, adapter_dir: Path | None, job: TrainJob, retrieved: int = 0) -> Scores:
        """Per-example held-out loss of the base (``adapter_dir`` None) or a saved adapter; with
        ``retrieved`` > 0, each prompt also shows that many of the user's most similar training
        examples (the retrieval baseline), scored on the same response tokens."""
        return self.score_views(base, adapter_dir, job, (retrieved,))[0]

    def score_views(self, base: LoadedBaseModel, adapter_dir: Path | None, job: TrainJob,
                    retrieved: tuple[int, ...]) -> list[Scores]:
        """``scores`` for each count of retrieved examples, the adapter attached once for all."""
        tok = base.tokenizer
        views = []
        for k in retrieved:
            if k:
                retriever = Retriever(job.retrievable or [*job.train, *job.validation])
                tokenized = [tokenize_retrieved(tok, ex, retriever.similar(ex.prompt, k), job.max_length)
                             for ex in job.eval]
            else:
                tokenized = [tokenize_example(tok, ex, job.max_length) for ex in job.eval]
            views.append(collate_in_order(tok, base.device, tokenized, job.batch_size))
        return _scored(base, adapter_dir, lambda model: [Scores(*example_losses(model, b)) for b in views])


class DpoTraining:
    """Sigmoid DPO against the frozen base; held-out measure: the DPO loss on eval pairs."""

    fusable = False  # chosen and rejected rows of a pair, and their base reference, go together
    retrieval = False

    def __init__(self, objective: DPO) -> None:
        self.beta = objective.beta

    def validate(self, job: TrainJob) -> None:
        validate_pairs(job.name, job.train, "train")
        validate_pairs(job.name, job.eval, "eval")
        validate_pairs(job.name, job.validation, "validation")

    def prepare(self, job: TrainJob, base: LoadedBaseModel) -> Prepared:
        pairs: list[PreferencePair] = list(job.train)
        batches = [
            to_device(pair_batch(base.tokenizer, [pairs[i] for i in idx], job.max_length), base.device)
            for idx in batch_order(len(pairs), job.batch_size, job.steps, job.seed)
        ]
        held_out = pair_batches(base, job.eval, job.batch_size, job.max_length)
        validation = pair_batches(base, job.validation, job.batch_size, job.max_length)
        with torch.no_grad():  # the reference is the frozen base, before any LoRA is attached
            refs = [sequence_logps(base.model, b) for b in batches]
            held_out_refs = [sequence_logps(base.model, b) for b in held_out]
            validation_refs = [sequence_logps(base.model, b) for b in validation]
        beta = self.beta

        def loss(model, i: int, batch: Batch) -> torch.Tensor:
            logps, ref = sequence_logps(model, batch), refs[i]
            n = logps.shape[0] // 2
            return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)[0]

        def evaluate(model) -> tuple[float | None, dict[str, float]]:
            metrics = preference_metrics(model, held_out, held_out_refs, beta)
            if metrics is None:
                return None, {}
            return metrics.loss, {"preference_accuracy": metrics.accuracy, "reward_margin": metrics.mean_margin}

        def validate(model) -> float | None:
            metrics = preference_metrics(model, validation, validation_refs, beta)
            return metrics.loss if metrics else None

        return Prepared(batches=batches, loss=loss, evaluate=evaluate, metrics_before_training=True, validate=validate)

    def scores(self, base: LoadedBaseModel, adapter_dir: Path | None, job: TrainJob, retrieved: int = 0) -> Scores:
        """Per-pair held-out DPO loss (the base scores ln 2 on each). No retrieval baseline:
        a preference is not a text to show."""
        if retrieved:
            raise ValueError("the retrieval baseline applies to SFT modes only")
        held_out = pair_batches(base, job.eval, job.batch_size, job.max_length)
        with torch.no_grad():
            refs = [sequence_logps(base.model, b) for b in held_out]

        def score(model) -> Scores:
            losses: list[float] = []
            with torch.no_grad():
                for batch, ref in zip(held_out, refs):
                    logps = sequence_logps(model, batch)
                    n = logps.shape[0] // 2
                    _mean, margins = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], self.beta)
                    losses += torch.nn.functional.softplus(-margins).tolist()  # each pair's -log sigmoid(margin)
            return Scores(losses, [1] * len(losses))

        return _scored(base, adapter_dir, score)


def training_for(objective: Objective) -> SftTraining | DpoTraining:
    """The implementation of a declared objective."""
    if isinstance(objective, SFT):
        return SftTraining()
    if isinstance(objective, DPO):
        return DpoTraining(objective)
    raise TypeError(f"no training implementation for objective {objective!r}")


class attached:
    """``with attached(base, dir) as model``: a saved adapter on the base, removed afterwards."""

    def __init__(self, base: LoadedBaseModel, adapter_dir: Path) -> None:
        self.base, self.adapter_dir = base, adapter_dir

    def __enter__(self):
        from lora_assets.training.peft_models import saved_lora

        self.model = saved_lora(self.base.model, self.adapter_dir, trainable=False)
        return self.model

    def __exit__(self, *exc) -> None:
        self.base.model = self.model.unload()
