"""The training variants on the tiny llama, the GPU's included: fused groups train each job as
alone would, in fp32 and in bf16, and a small job leaves its group as soon as it is done."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_assets.adapters import job_for
from lora_assets.modes import MODES, build_examples
from lora_assets.objective import DPO
from lora_assets.training import TrainJob, load_base_model, read_adapter_metadata, train_adapters
from lora_assets.training.core import evaluate_adapter
from lora_assets.training.inference import load_adapter
from lora_assets.training.variant import BATCHED, INTERLEAVED, SEQUENTIAL, plan_training

MAIL, SEARCH = MODES["mail_reply"], MODES["search_suggest"]


def _mixed_jobs(tables, out: Path) -> list[TrainJob]:
    """Four jobs of different users and modes, example counts, step budgets, rates and seeds."""

    def mail(user, name, **kw):
        job = job_for(MAIL, user, build_examples(MAIL, tables[user]), out / name, steps=kw.pop("max_steps"))
        return replace(job, learning_rate=1e-2, **kw)

    jobs = [
        mail("user-000", "a", max_steps=6),
        mail("user-001", "b", max_steps=3, seed=7),
        replace(job_for(SEARCH, "user-000", build_examples(SEARCH, tables["user-000"]), out / "c", steps=5),
                learning_rate=5e-3),
        mail("user-001", "d", max_steps=4),
    ]
    jobs[3] = replace(jobs[3], train=jobs[3].train[:5])
    assert len({len(j.train) for j in jobs}) == 4 and len({j.steps for j in jobs}) == 4
    return jobs


def _tensors(job: TrainJob) -> dict[str, torch.Tensor]:
    return load_file(Path(job.output_dir) / "adapter_model.safetensors")


def _relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest relative (Frobenius) difference of any tensor of two adapters."""
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.fixture(scope="module")
def trained(tiny_base, bf16_base, synthetic_tables, tmp_path_factory):
    """The same four jobs trained every way: (dtype, variant) -> (jobs, results)."""
    out = tmp_path_factory.mktemp("variants")
    runs = {}
    for dtype, base in (("fp32", tiny_base), ("bf16", bf16_base)):
        for variant in (SEQUENTIAL, INTERLEAVED, BATCHED):
            jobs = _mixed_jobs(synthetic_tables, out / dtype / variant)
            runs[dtype, variant] = jobs, train_adapters(jobs, base, progress=None, fusion=variant, fuse=8)
    return runs


def test_on_a_cpu_auto_trains_sequentially_and_on_a_gpu_batches_sft_shortest_first(synthetic_tables, tmp_path):
    jobs = _mixed_jobs(synthetic_tables, tmp_path)
    dpo = TrainJob(name="u/tone", train=[object()], output_dir=tmp_path / "dpo", objective=DPO(), max_steps=2)
    jobs.append(dpo)
    cpu = plan_training(jobs, torch.device("cpu"), fuse=8)
    assert [g.variant for g in cpu] == [SEQUENTIAL] * 5
    assert [g.jobs for g in cpu] == [(4,), (1,), (3,), (2,), (0,)]  # 2, 3, 4, 5, 6 steps
    gpu = plan_training(jobs, torch.device("cuda"), fuse=3)
    assert [(g.variant, g.jobs, g.jobs_per_pass) for g in gpu] == [
        (SEQUENTIAL, (4,), 1),  # DPO never fuses
        (BATCHED, (1, 3, 2), 3),  # the three shortest SFT jobs, one pass per step for all three
        (SEQUENTIAL, (0,), 1),  # a group of one is just a job
    ]
    assert [g.variant for g in plan_training(jobs, torch.device("cuda"), fuse=1)] == [SEQUENTIAL] * 5


@pytest.mark.parametrize("variant", [INTERLEAVED, BATCHED])
def test_in_fp32_a_fused_job_trains_to_the_tensors_it_has_alone(trained, variant):
    alone_jobs, alone = trained["fp32", SEQUENTIAL]
    fused_jobs, fused = trained["fp32", variant]
    assert [r.fused_with for r in fused] == [4] * 4 and [r.fused_with for r in alone] == [1] * 4
    for f, a, fj, aj in zip(fused, alone, fused_jobs, alone_jobs):
        assert f.steps == a.steps == fj.steps
        assert f.loss_curve == pytest.approx(a.loss_curve, rel=1e-4, abs=1e-5)
        assert f.adapter_eval_loss == pytest.approx(a.adapter_eval_loss, rel=1e-5)
        assert f.base_eval_loss == pytest.approx(a.base_eval_loss, rel=1e-6)
        assert (f.train_tokens, f.total_tokens) == (a.train_tokens, a.total_tokens)
        ft, at = _tensors(fj), _tensors(aj)
        assert ft.keys() == at.keys()
        for name in ft:
            torch.testing.assert_close(ft[name], at[name], rtol=1e-4, atol=1e-5)
    meta = read_adapter_metadata(fused_jobs[2].output_dir)
    assert meta["mode"] == "search_suggest" and meta["metrics"]["fused_with"] == 4


def test_in_bf16_a_batched_pass_adds_no_error_beyond_what_bf16_itself_makes(trained):
    """One job per pass is exactly the sequential path in bf16 too (same kernels, same rows);
    the batched pass runs the base GEMMs on other shapes, so bf16 rounds differently. Measured
    here (4 jobs, 3-6 steps): adapters differ from one job per pass by 0-5 % in relative norm
    (Adam normalises tiny gradients, so rounding shows), while the same job in bf16 differs from
    fp32 by 7-9 %: bound 1.5x that job's bf16-vs-fp32 gap. Held-out loss: 0-0.0025 nats apart,
    at most 0.26 % of what training gained (~1 nat): bound 1 %. Per-step training loss: at most
    0.001 apart, against bf16-vs-fp32 gaps up to 0.0054: bound 0.005."""
    jobs32, _ = trained["fp32", INTERLEAVED]
    seq_jobs, seq = trained["bf16", SEQUENTIAL]
    int_jobs, inter = trained["bf16", INTERLEAVED]
    bat_jobs, batched = trained["bf16", BATCHED]
    for j in range(4):
        for name, tensor in _tensors(int_jobs[j]).items():
            torch.testing.assert_close(tensor, _tensors(seq_jobs[j])[name], rtol=0, atol=0)
        bf16_gap = _relative(_tensors(int_jobs[j]), _tensors(jobs32[j]))
        assert _relative(_tensors(bat_jobs[j]), _tensors(int_jobs[j])) <= 1.5 * bf16_gap
        gained = inter[j].base_eval_loss - inter[j].adapter_eval_loss
        assert abs(batched[j].adapter_eval_loss - inter[j].adapter_eval_loss) <= 0.01 * gained
        assert batched[j].loss_curve == pytest.approx(inter[j].loss_curve, abs=5e-3)


def test_bf16_adapters_beat_the_base_and_load_back_with_the_safetensors_loader(trained, bf16_base, tiny_base):
    jobs, results = trained["bf16", BATCHED]
    for job, result in zip(jobs, results):
        assert result.adapter_eval_loss < result.base_eval_loss - 0.5, result
        weights = _tensors(job)
        assert all(t.dtype == torch.float32 for t in weights.values()), "LoRA weights stay fp32, as in peft"
        model = load_adapter(bf16_base, job.output_dir)
        try:
            probe = torch.tensor([[1, 520, 33, 4097, 12, 88]])
            with torch.no_grad():
                adapted = model(input_ids=probe).logits
                with model.disable_adapter():
                    bare = model(input_ids=probe).logits
            assert adapted.dtype == torch.bfloat16 and not torch.allclose(adapted, bare)
        finally:
            bf16_base.model = model.unload()
        # ... and the same file on the fp32 base scores the job's held-out set like in training.
        assert evaluate_adapter(tiny_base, job.output_dir, job.eval) == pytest.approx(result.adapter_eval_loss, abs=0.05)


def test_timings_say_what_was_measured(trained):
    _, alone = trained["fp32", SEQUENTIAL]
    _, fused = trained["fp32", BATCHED]
    for r in alone:
        assert r.timing().keys() == {"train_seconds", "tokens_per_second"} and r.seconds > 0
    for r in fused:
        assert r.seconds is None and r.tokens_per_second is None, "a fused job has no wall time of its own"
        assert r.timing().keys() == {"group_seconds", "group_tokens_per_second", "fused_with"}
    # Jobs leave the group when done: a 3-step job's group time is shorter than a 6-step job's.
    by_steps = sorted(fused, key=lambda r: r.steps)
    assert [r.steps for r in by_steps] == [3, 4, 5, 6]
    assert all(a.group_seconds < b.group_seconds for a, b in zip(by_steps, by_steps[1:]))


def test_a_small_job_is_saved_and_handed_over_before_its_group_trains_on(tiny_base, synthetic_tables, tmp_path):
    jobs = _mixed_jobs(synthetic_tables, tmp_path)
    events: list[tuple] = []

    def progress(name, step, total, loss, rate):
        events.append(("step", name, step))

    def on_saved(job, result):
        # The base is free again: nothing fused is left in it, and the adapter is on disk.
        assert (Path(job.output_dir) / "adapter_model.safetensors").is_file()
        assert not any(type(m).__name__ == "FusedLora" for m in tiny_base.model.modules())
        events.append(("saved", job.name, result.steps))

    train_adapters(jobs, tiny_base, progress=progress, fusion=BATCHED, on_saved=on_saved)
    saved = [e for e in events if e[0] == "saved"]
    assert [e[2] for e in saved] == [3, 4, 5, 6], "saved in the order their budgets ran out"
    longest = jobs[0].name  # 6 steps
    first_saved = events.index(saved[0])
    assert ("step", longest, 4) in events[first_saved:], "the 3-step job did not wait for the 6-step one"


def test_fp16_trains_batched_as_one_job_per_pass_does(home, synthetic_tables, tmp_path):
    """fp16 takes the same casts as bf16 (fp32 LoRA on a half-precision base)."""
    base = load_base_model("tiny-llama", home, device="cpu", dtype="fp16")
    runs = {}
    for variant in (INTERLEAVED, BATCHED):
        jobs = [replace(j, max_steps=2) for j in _mixed_jobs(synthetic_tables, tmp_path / variant)[:2]]
        runs[variant] = train_adapters(jobs, base, progress=None, fusion=variant)
    for inter, batched in zip(runs[INTERLEAVED], runs[BATCHED]):
        assert batched.fused_with == 2 and batched.adapter_eval_loss < batched.base_eval_loss - 0.1
        gained = inter.base_eval_loss - inter.adapter_eval_loss
        assert abs(batched.adapter_eval_loss - inter.adapter_eval_loss) <= 0.01 * gained
