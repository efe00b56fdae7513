"""Text generation with a base model plus (optionally) one user's adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.core import chat_prompt_ids


def load_adapter(base: LoadedBaseModel, adapter_dir: Path):
    """Attach a saved PEFT adapter to the loaded base (safetensors only, inference mode)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {adapter_dir}")
    model = PeftModel.from_pretrained(base.model, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


@torch.no_grad()
def generate(
    model, tokenizer, prompt: str, system: str | None = None, max_new_tokens: int = 64
) -> str:
    """Greedy completion of one chat turn, so the same adapter always says the same thing."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt, system)  # the same rendering training used
    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip()
