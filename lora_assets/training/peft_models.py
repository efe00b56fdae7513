"""Putting a LoRA on the base model, in one place: a new one, or a saved one.

peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
FutureWarning on every call; it would be printed on every CLI command and in every daemon log.
That one warning is silenced here, around peft's own calls, and nowhere else.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def _peft_deprecations_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def new_lora(model: Any, config: Any) -> Any:
    """``get_peft_model``: a fresh LoRA of ``config`` injected into ``model``."""
    from peft import get_peft_model

    with _peft_deprecations_silenced():
        return get_peft_model(model, config)


def saved_lora(model: Any, adapter_dir: Path | str, trainable: bool) -> Any:
    """``PeftModel.from_pretrained``: a saved adapter on ``model``."""
    from peft import PeftModel

    with _peft_deprecations_silenced():
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
