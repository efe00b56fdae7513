"""The retrieval baseline: the base model shown the user's own most similar past examples.

The obvious alternative to training an adapter is to put the user's K most similar training
examples into the prompt (LaMP, Salemi & Zamani 2024, arXiv 2409.09510, found it ahead of per-user
PEFT there). The gate scores it on every adapter's held-out set, so each user's figures say
whether their adapter beats it, and whether adapter + retrieval beats the adapter alone.

Similarity is TF-IDF cosine over the prompts (the message being answered): no model, no index
service, a few milliseconds for a user's examples. The retrieved replies come after the message,
each cut to ``MAX_SHOWN_CHARS``, so when the prompt is too long its beginning is cut, as for any
prompt. The response tokens scored are exactly those of the plain evaluation: the prompt alone
gets ``extra_tokens`` more room, so the two losses are over the same tokens.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from lora_assets.training.text import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    chat_prompt_ids,
    tokenize_example,
)

MAX_SHOWN_CHARS = 400  # of each retrieved reply
TOKENS_PER_SHOWN = 128  # prompt room added per retrieved reply
HEADER = "Replies I wrote earlier to similar messages:"
_WORD = re.compile(r"[a-z0-9']+")


def _terms(text: str) -> Counter:
    return Counter(_WORD.findall(text.lower()))


class Retriever:
    """TF-IDF over the prompts of a user's training examples."""

    def __init__(self, train: Sequence[Example]) -> None:
        self.train = list(train)
        counts = [_terms(ex.prompt) for ex in self.train]
        df = Counter(t for c in counts for t in c)
        n = len(self.train)
        self.idf = {t: math.log((1 + n) / (1 + d)) + 1.0 for t, d in df.items()}
        self.vectors = [self._vector(c) for c in counts]

    def _vector(self, counts: Counter) -> dict[str, float]:
        v = {t: c * self.idf.get(t, 0.0) for t, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {t: x / norm for t, x in v.items() if x}

    def similar(self, query: str, k: int) -> list[Example]:
        """The ``k`` training examples whose prompts are most like ``query`` (ties: earlier first)."""
        q = self._vector(_terms(query))
        scores = [sum(w * vec.get(t, 0.0) for t, w in q.items()) for vec in self.vectors]
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.train[i] for i in order[:k]]


def with_retrieved(prompt: str, shown: Sequence[Example]) -> str:
    """``prompt`` followed by the retrieved replies (the gate scores this; serving sends it)."""
    replies = "\n\n---\n".join(ex.response[:MAX_SHOWN_CHARS] for ex in shown)
    return f"{prompt}\n\n{HEADER}\n\n{replies}" if shown else prompt


def tokenize_retrieved(tokenizer, example: Example, shown: Sequence[Example], max_length: int) -> TokenizedExample:
    """``example`` with ``shown`` in its prompt, scored on the same response tokens as without."""
    plain = tokenize_example(tokenizer, example, max_length)
    response = [t for t, label in zip(plain.input_ids, plain.labels) if label != IGNORE_INDEX]
    prompt = chat_prompt_ids(tokenizer, with_retrieved(example.prompt, shown), example.system)
    room = max_length + TOKENS_PER_SHOWN * len(shown) - len(response)
    prompt = prompt[max(0, len(prompt) - room):]
    return TokenizedExample(input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response)
