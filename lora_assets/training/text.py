"""Examples as tokens: chat rendering, response-only labels, seeded batches, response loss.

Shared by every objective and by the fused trainer, so they all see the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One chat-format training example: the model should answer ``prompt`` with ``response``."""

    prompt: str
    response: str
    system: str | None = None  # the mode's instruction, rendered as the chat's system turn
    id: str = ""  # stable id of the record the example came from, for error messages


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
    """Token ids of a one-turn chat up to where the assistant starts answering."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return chat_ids(tokenizer, messages)


def chat_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat (``role``/``content`` turns) up to where the assistant answers next.

    The serving API renders a client's conversation here, so a one-turn request is the exact
    rendering an adapter was trained on.
    """
    messages = list(messages)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Item indices of each step: one seeded shuffle per epoch, epochs concatenated."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        order.extend(epoch)
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def make_batches(
    tokenized: Sequence[TokenizedExample], batch_size: int, steps: int, seed: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """The exact batches a job trains on: epoch-wise seeded shuffles, padded to each batch's longest."""
    return [collate([tokenized[i] for i in idx], pad_id) for idx in batch_order(len(tokenized), batch_size, steps, seed)]


def collate(items: Sequence[TokenizedExample], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item (or ``width``); pads are masked out of attention and loss."""
    width = max(width or 0, max(len(it.input_ids) for it in items))
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_batch(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """A collated batch right-padded to ``width`` columns (masked like any other padding)."""
    extra = width - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    return {k: F.pad(v, (0, extra), value=fill[k]) for k, v in batch.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def causal_lm(model):
    """The transformers CausalLM under a PeftModel (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supervised_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at supervised positions only (LM head applied there alone), their next tokens,
    and the (rows, positions) mask they were taken from."""
    inner = causal_lm(model)
    hidden = inner.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    logits = head_logits(inner.get_output_embeddings(), hidden[:, :-1][keep]).float()
    return logits, targets[keep], keep


def head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on ``hidden``; while training, through ``_FrozenHead`` (same values).

    Why: the head's backward, ``grad @ W`` with ``W`` the (vocabulary x hidden) weight as
    stored, is torch's slow case on a CPU without bf16 kernels (AVX2 only: 3.0 s in bf16 for a
    600-token batch of a 49k-vocabulary head, 0.2 s with ``W`` transposed in memory). The head
    is frozen, so one transposed copy per loaded model serves every step. On a GPU the copy buys
    nothing and costs the head's size once (57 MB for SmolLM2-135M in bf16); it is kept on every
    device so that the path a GPU trains on is the one CI runs. A head that trains (a LoRA on
    it) or evaluation without gradients takes the plain call."""
    if not torch.is_grad_enabled() or type(head) is not torch.nn.Linear or head.bias is not None \
            or head.weight.requires_grad:
        return head(hidden)
    return _FrozenHead.apply(hidden, head.weight, _transposed(head))


def _transposed(head: torch.nn.Linear) -> torch.Tensor:
    """``head.weight.t().contiguous()``, made once and kept on the head (not in its state dict),
    so it lives and dies with the loaded model; remade if the weight was replaced, changed or moved."""
    weight = head.weight
    kept = head.__dict__.get("_weight_transposed")
    if kept is None or kept[0] is not weight or kept[1] != weight._version or kept[2].device != weight.device \
            or kept[2].dtype != weight.dtype:
        kept = head.__dict__["_weight_transposed"] = (weight, weight._version, weight.detach().t().contiguous())
    return kept[2]


class _FrozenHead(torch.autograd.Function):
    """``x @ W.t()`` whose backward gives ``x`` its gradient from the transposed copy."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_t)
        return F.linear(hidden, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight_t,) = ctx.saved_tensors
        return grad @ weight_t.t(), None, None


def supervised_rows(keep: torch.Tensor) -> torch.Tensor:
    """The batch row of each supervised position ``supervised_logits`` returned, in its order."""
    return torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]


def response_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy on supervised positions only."""
    logits, targets, _keep = supervised_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction=reduction)


def response_loss_per_block(model, batch: dict[str, torch.Tensor], blocks: int) -> torch.Tensor:
    """Mean response loss of each of ``blocks`` equally tall row blocks of ``batch``: what
    ``response_loss`` gives each block alone, from one forward pass over all of them."""
    logits, targets, keep = supervised_logits(model, batch)
    block = supervised_rows(keep) // (keep.shape[0] // blocks)
    token_loss = F.cross_entropy(logits, targets, reduction="none")
    sums = torch.zeros(blocks, device=logits.device).index_add(0, block, token_loss)
    counts = torch.zeros(blocks, device=logits.device).index_add(0, block, torch.ones_like(token_loss))
    return sums / counts


def supervised_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@torch.no_grad()
def eval_loss(model, batches: Sequence[dict[str, torch.Tensor]]) -> float | None:
    """Token-weighted mean response loss over all eval batches."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for batch in batches:
        total += response_loss(model, batch, reduction="sum").item()
        count += supervised_tokens(batch)
    model.train(was_training)
    return total / count if count else None


@torch.no_grad()
def example_losses(model, batches: Sequence[dict[str, torch.Tensor]]) -> tuple[list[float], list[int]]:
    """Each row's summed response loss and its response tokens, in order: what a paired
    comparison of two models on the same held-out examples needs."""
    losses: list[float] = []
    tokens: list[int] = []
    was_training = model.training
    model.eval()
    for batch in batches:
        logits, targets, keep = supervised_logits(model, batch)
        rows = supervised_rows(keep)
        token_loss = F.cross_entropy(logits, targets, reduction="none")
        n = keep.shape[0]
        losses += torch.zeros(n, device=logits.device).index_add(0, rows, token_loss).tolist()
        tokens += keep.sum(dim=1).tolist()
    model.train(was_training)
    return losses, tokens


def eval_batches_for(
    tokenizer, device: torch.device, examples: Sequence[Example], batch_size: int = 8, max_length: int = 128
) -> list[dict[str, torch.Tensor]]:
    """Held-out examples in order, collated ``batch_size`` at a time, on ``device``."""
    return collate_in_order(tokenizer, device, [tokenize_example(tokenizer, ex, max_length) for ex in examples], batch_size)


def collate_in_order(
    tokenizer, device: torch.device, tokenized: Sequence[TokenizedExample], batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Tokenized examples in order, collated ``batch_size`` at a time, on ``device``."""
    return [
        to_device(collate(tokenized[i : i + batch_size], tokenizer.pad_token_id), device)
        for i in range(0, len(tokenized), batch_size)
    ]
