"""Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss, on LoRA adapters.

For a pair (prompt x, chosen y_w, rejected y_l) and reference model pi_ref:

    loss = -log sigmoid( beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ] )

The reference is the frozen base model (its log-probs are taken before any LoRA is attached),
also when training warm-starts from the user's previous adapter. Why the base and not the
previous adapter: the implicit reward is then measured from the same anchor in every round, and
the KL pull is towards the base model's language ability, so a chain of retrains cannot drift
further and further from it; the previous adapter still carries what it learned, because the
policy starts from it. Reference log-probs are computed once per pair, before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_assets.training.jobs import InvalidTrainingData, validate_examples
from lora_assets.training.text import (
    Example,
    collate,
    supervised_logits,
    supervised_rows,
    to_device,
    tokenize_example,
)


@dataclass(frozen=True)
class PreferencePair:
    """The user preferred ``chosen`` over ``rejected`` as the answer to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    system: str | None = None
    id: str = ""


def validate_pairs(job_name: str, pairs: Sequence[PreferencePair], split: str) -> None:
    """Raise InvalidTrainingData naming the job and the first bad pair."""
    validate_examples(job_name, pairs, split, PreferencePair, ("prompt", "chosen", "rejected"))
    for i, pair in enumerate(pairs):
        if pair.chosen.strip() == pair.rejected.strip():
            where = f"job {job_name!r}: {split} pair {i}" + (f" (id={pair.id})" if pair.id else "")
            raise InvalidTrainingData(f"{where}: chosen and rejected are identical")


def pair_batch(tokenizer, pairs: Sequence[PreferencePair], max_length: int) -> dict[str, torch.Tensor]:
    """Chosen rows first, then rejected rows, as one padded batch."""
    chosen = [tokenize_example(tokenizer, Example(p.prompt, p.chosen, p.system, p.id), max_length) for p in pairs]
    rejected = [tokenize_example(tokenizer, Example(p.prompt, p.rejected, p.system, p.id), max_length) for p in pairs]
    return collate(chosen + rejected, tokenizer.pad_token_id)


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log-probabilities of each row's response tokens (LM head on those positions only)."""
    logits, targets, keep = supervised_logits(model, batch)
    token_logps = torch.gather(F.log_softmax(logits, dim=-1), 1, targets.unsqueeze(1)).squeeze(1)
    return torch.zeros(keep.shape[0], device=logits.device).index_add(0, supervised_rows(keep), token_logps)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigmoid DPO loss and the per-pair reward margins beta * (log-ratio difference)."""
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins


@dataclass(frozen=True)
class PreferenceMetrics:
    loss: float  # mean DPO loss (ln 2 = 0.693 when the policy equals the reference)
    accuracy: float  # share of pairs whose implicit reward prefers the chosen answer
    mean_margin: float  # mean reward margin, in nats scaled by beta


@torch.no_grad()
def preference_metrics(
    model, batches: Sequence[dict[str, torch.Tensor]], refs: Sequence[torch.Tensor], beta: float
) -> PreferenceMetrics | None:
    was_training = model.training
    model.eval()
    losses, margins = [], []
    for batch, ref in zip(batches, refs):
        logps = sequence_logps(model, batch)
        n = logps.shape[0] // 2
        loss, margin = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
        losses.append(loss * n)
        margins.append(margin)
    model.train(was_training)
    if not margins:
        return None
    all_margins = torch.cat(margins)
    return PreferenceMetrics(
        loss=float(sum(losses) / all_margins.numel()),
        accuracy=float((all_margins > 0).float().mean()),
        mean_margin=float(all_margins.mean()),
    )


def pair_batches(base, pairs: Sequence[PreferencePair], batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """Held-out pairs in order, ``batch_size`` pairs (2x rows) at a time, on the base's device."""
    return [
        to_device(pair_batch(base.tokenizer, pairs[i : i + batch_size], max_length), base.device)
        for i in range(0, len(pairs), batch_size)
    ]
