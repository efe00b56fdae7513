"""Text generation with a base model plus (optionally) one user's adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_assets.training.base_models import LoadedBaseModel
from lora_assets.training.text import chat_prompt_ids


def load_adapter(base: LoadedBaseModel, adapter_dir: Path):
    """Attach a saved PEFT adapter to the loaded base, reading tensors with safetensors only.

    No pickle and no ``torch.load`` ever touch the files: the config is JSON, the weights are
    ``adapter_model.safetensors``, and every LoRA tensor the config implies must be present.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    from lora_assets.training.peft_models import new_lora
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter_model.safetensors in {folder}")
    config = LoraConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model = new_lora(base.model, config)
    result = set_peft_model_state_dict(model, load_file(str(weights), device=str(base.device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        model.unload()
        raise ValueError(
            f"{weights}: tensors do not match adapter_config.json "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})"
        )
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
