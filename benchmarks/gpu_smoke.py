"""GPU smoke check: SFT and DPO adapters trained through the core on CUDA (bf16), reloaded exactly.

    python3 benchmarks/gpu_smoke.py      # on a machine with a GPU, torch, transformers and peft

Needs only the training core (no dagster) and a tiny-llama cache under $LORA_ASSETS_HOME
(default .gpu_check/home, copied from a local data dir's base_models/tiny-llama). Prints the
device, dtype, tokens/s, losses and DPO metrics, and the reload logit difference.
"""

import os, sys, time, json
os.environ.setdefault("LORA_ASSETS_HOME", os.path.abspath(".gpu_check/home"))
sys.path.insert(0, ".")
import torch, transformers, peft
print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
from dataclasses import replace
from pathlib import Path
from lora_assets.data.synthetic import generate_user
from lora_assets.modes import MODES, build_examples
from lora_assets.adapters import job_for
from lora_assets.training import load_base_model, train_adapters
from lora_assets.training.inference import load_adapter
base = load_base_model("tiny-llama")
print("device", base.device, "dtype", base.dtype, next(base.model.parameters()).dtype)
tables = generate_user("user-000")
out = Path(os.environ.get("OUT", "/tmp/out"))
jobs = []
for name in ("mail_reply", "tone_rewrite"):
    mode = MODES[name]
    df = build_examples(mode, tables)
    jobs.append(replace(job_for(mode, "user-000", df, out / name, steps=30), learning_rate=1e-2))
probe = torch.tensor([[1, 520, 33, 4097, 12, 88, 9000, 2]], device=base.device)
logits = {}
def cap(job, model):
    with torch.no_grad():
        logits[job.name] = model(input_ids=probe).logits.float().clone()
t = time.time()
results = train_adapters(jobs, base, progress=None, on_trained=cap)
print("trained in %.1fs" % (time.time() - t))
for r in results:
    print(r.name, "base %.4f adapter %.4f tok/s %.0f" % (r.base_eval_loss, r.adapter_eval_loss, r.tokens_per_second), {k: round(v, 3) for k, v in r.extra_metrics.items()})
    assert r.adapter_eval_loss < r.base_eval_loss
for j in jobs:
    m = load_adapter(base, j.output_dir)
    with torch.no_grad():
        diff = (m(input_ids=probe).logits.float() - logits[j.name]).abs().max().item()
    base.model = m.unload()
    print(j.name, "reload max |logit diff|", diff)
    assert diff < 1e-2
print("GPU CHECK OK")
