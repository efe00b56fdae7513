"""The training core, on the tiny llama: it learns, it is personal, it is reproducible."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_assets.adapters import examples_from, job_for
from lora_assets.modes import MODES, build_examples
from lora_assets.training import (
    Example,
    InvalidTrainingData,
    TrainJob,
    read_adapter_metadata,
    train_adapters,
)
from lora_assets.training.core import evaluate_adapter
from lora_assets.training.text import IGNORE_INDEX, tokenize_example

MAIL = MODES["mail_reply"]


def _mail_job(tables, user: str, out: Path, **overrides) -> TrainJob:
    dataset = build_examples(MAIL, tables[user])
    job = job_for(MAIL, user, dataset, out, steps=30)
    return replace(job, **{"learning_rate": 1e-2, **overrides})  # tiny random model: higher lr than SmolLM2


def _tensors(adapter: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def two_user_adapters(tiny_base, synthetic_tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters")
    jobs = [_mail_job(synthetic_tables, u, out / u) for u in ("user-000", "user-001")]
    results = train_adapters(jobs, tiny_base, progress=None)
    return jobs, results


def test_training_lowers_held_out_loss(two_user_adapters):
    _, results = two_user_adapters
    for r in results:
        assert r.adapter_eval_loss < r.base_eval_loss - 0.5, r
        assert r.loss_curve[-1] < r.loss_curve[0]
        assert r.train_tokens > 0 and r.tokens_per_second > 0 and r.steps == 30


def test_own_adapter_beats_another_users_adapter_on_own_data(tiny_base, two_user_adapters):
    jobs, _ = two_user_adapters
    a, b = jobs
    own_a = evaluate_adapter(tiny_base, a.output_dir, a.eval)
    other_a = evaluate_adapter(tiny_base, b.output_dir, a.eval)
    own_b = evaluate_adapter(tiny_base, b.output_dir, b.eval)
    other_b = evaluate_adapter(tiny_base, a.output_dir, b.eval)
    assert own_a < other_a
    assert own_b < other_b


def test_adapter_folder_is_standard_peft_with_metadata(two_user_adapters):
    jobs, results = two_user_adapters
    folder = jobs[0].output_dir
    assert (folder / "adapter_model.safetensors").is_file()
    assert (folder / "adapter_config.json").is_file()
    meta = read_adapter_metadata(folder)
    assert meta["base_model"] == "tiny-llama"
    assert meta["base_model_revision"].startswith("seed0-sha256:")
    assert meta["user"] == "user-000" and meta["mode"] == "mail_reply"
    assert meta["metrics"]["adapter_eval_loss"] == pytest.approx(results[0].adapter_eval_loss)


def test_saved_adapter_reloads_with_plain_peft_and_gives_same_logits(
    tiny_base, synthetic_tables, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    probe = torch.tensor([[1, 520, 33, 4097, 12, 88, 9000, 2]])
    captured = {}

    def capture(job, model):
        with torch.no_grad():
            captured["logits"] = model(input_ids=probe).logits.clone()

    job = _mail_job(synthetic_tables, "user-000", tmp_path / "a", max_steps=5)
    train_adapters([job], tiny_base, progress=None, on_trained=capture)

    fresh_base = AutoModelForCausalLM.from_pretrained(tiny_base.ref.path)
    reloaded = PeftModel.from_pretrained(fresh_base, str(job.output_dir))
    with torch.no_grad():
        logits = reloaded(input_ids=probe).logits
    torch.testing.assert_close(logits, captured["logits"], rtol=1e-5, atol=1e-5)
    with reloaded.disable_adapter(), torch.no_grad():
        bare = reloaded(input_ids=probe).logits
    assert not torch.allclose(bare, logits, atol=1e-4), "the adapter must change the output"


def test_same_seed_gives_same_adapter_tensors(tiny_base, synthetic_tables, tmp_path):
    job = _mail_job(synthetic_tables, "user-000", tmp_path / "one", max_steps=4)
    twin = replace(job, output_dir=tmp_path / "two")
    other_seed = replace(job, output_dir=tmp_path / "three", seed=1)
    train_adapters([job], tiny_base, progress=None)
    train_adapters([twin], tiny_base, progress=None)
    train_adapters([other_seed], tiny_base, progress=None)
    first, second, third = (_tensors(j.output_dir) for j in (job, twin, other_seed))
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert any(not torch.equal(first[n], third[n]) for n in first), "another seed must differ"


def test_several_jobs_in_one_sequential_call_equal_each_job_alone(tiny_base, synthetic_tables, tmp_path):
    together = [
        _mail_job(synthetic_tables, u, tmp_path / "together" / u, max_steps=4)
        for u in ("user-000", "user-001")
    ]
    alone = [replace(j, output_dir=tmp_path / "alone" / j.output_dir.name) for j in together]
    train_adapters(together, tiny_base, progress=None, fuse=1)
    for j in alone:
        train_adapters([j], tiny_base, progress=None, fuse=1)
    for t, a in zip(together, alone):
        ta, aa = _tensors(t.output_dir), _tensors(a.output_dir)
        for name in ta:
            torch.testing.assert_close(ta[name], aa[name], rtol=0, atol=0)


@pytest.mark.parametrize("fusion", ["sequential", "interleaved"])
def test_a_jobs_rate_falls_linearly_to_its_decay_to_over_its_steps(tiny_base, synthetic_tables, tmp_path, monkeypatch, fusion):
    """What each optimizer step trained at, read from AdamW itself, on both training loops."""
    rates: dict[torch.optim.AdamW, list[float]] = {}  # keyed by the optimizer, which it keeps alive:
    plain_step = torch.optim.AdamW.step              # an id() could be reused once the first one is freed

    def recording_step(self, *args, **kwargs):
        rates.setdefault(self, []).append(self.param_groups[0]["lr"])
        return plain_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    jobs = [_mail_job(synthetic_tables, "user-000", tmp_path / "decay", max_steps=5, learning_rate=1e-3, decay_to=0.1),
            _mail_job(synthetic_tables, "user-001", tmp_path / "flat", max_steps=4, learning_rate=2e-3)]
    train_adapters(jobs, tiny_base, progress=None, fusion=fusion, fuse=2)
    assert sorted(rates.values(), key=len) == [
        pytest.approx([2e-3] * 4),  # decay_to 1: a constant rate
        pytest.approx([1e-3, 0.82e-3, 0.64e-3, 0.46e-3, 0.28e-3]),  # 1e-3 x (1 - 0.9 step / 5)
    ]
    assert read_adapter_metadata(jobs[0].output_dir)["decay_to"] == 0.1


def test_warm_start_continues_from_previous_adapter(tiny_base, synthetic_tables, tmp_path):
    first = _mail_job(synthetic_tables, "user-000", tmp_path / "v1", max_steps=10)
    (r1,) = train_adapters([first], tiny_base, progress=None)
    second = replace(first, output_dir=tmp_path / "v2", warm_start_from=first.output_dir)
    (r2,) = train_adapters([second], tiny_base, progress=None)
    # Starting from v1, the first step's loss is v1's level, not the base's.
    assert r2.loss_curve[0] < r1.loss_curve[0] - 0.5
    assert read_adapter_metadata(second.output_dir)["warm_start_from"] == str(first.output_dir)


@pytest.mark.parametrize(
    "examples, message",
    [
        ([], "no training examples"),
        ([Example(prompt="hi", response="")], "empty response"),
        ([Example(prompt="  ", response="ok", id="mail-7")], "(id=mail-7): empty prompt"),
        ([Example(prompt="hi", response=float("nan"), id="mail-9")], "(id=mail-9): response must be a string"),
    ],
)
def test_bad_examples_fail_naming_the_job_and_write_nothing(
    tiny_base, synthetic_tables, tmp_path, examples, message
):
    good = _mail_job(synthetic_tables, "user-001", tmp_path / "good", max_steps=2)
    bad = TrainJob(name="user-000/mail_reply", train=examples, output_dir=tmp_path / "bad")
    with pytest.raises(InvalidTrainingData) as err:
        train_adapters([good, bad], tiny_base, progress=None)
    assert "user-000/mail_reply" in str(err.value)
    assert message in str(err.value)
    assert not (tmp_path / "bad").exists()
    assert not (tmp_path / "good").exists(), "jobs are validated before any training"


@pytest.mark.parametrize("files, message", [({"peft_dtype": "int4"}, "peft_dtype 'int4'"),
                                            ({"gguf_type": "q2_k"}, "gguf_type 'q2_k'")])
def test_an_unknown_file_format_fails_the_job_before_training(tiny_base, synthetic_tables, tmp_path, files, message):
    job = replace(_mail_job(synthetic_tables, "user-000", tmp_path / "a", max_steps=2), **files)
    with pytest.raises(InvalidTrainingData, match=message):
        train_adapters([job], tiny_base, progress=None)
    assert not (tmp_path / "a").exists()


def test_examples_keep_loss_on_response_tokens_only(tiny_base):
    ex = Example(prompt="Where shall we meet?", response="At the lake!", system="Reply as me.")
    tok = tokenize_example(tiny_base.tokenizer, ex, max_length=128)
    supervised = [t for t, lab in zip(tok.input_ids, tok.labels) if lab != IGNORE_INDEX]
    assert tiny_base.tokenizer.decode(supervised) == "At the lake!" + tiny_base.tokenizer.eos_token
    # A prompt too long for max_length is cut from the left; the response survives.
    long = tokenize_example(tiny_base.tokenizer, replace(ex, prompt="word " * 500), max_length=64)
    assert len(long.input_ids) == 64
    assert [t for t in long.labels if t != IGNORE_INDEX] == supervised


def test_dataset_rows_become_train_and_eval_examples(synthetic_tables):
    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    train, held_out = examples_from(dataset, "train"), examples_from(dataset, "eval")
    assert train and held_out
    assert {e.id for e in train}.isdisjoint({e.id for e in held_out})
    assert all(e.system == MAIL.system for e in train)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_training_steps_lora_gradients_are_the_plain_transformers_losss(
        request, tiny_base, synthetic_tables, dtype):
    """The core's loss (the LM head at response positions only, its backward from a transposed
    copy of the frozen head) gives the LoRA weights the gradients of transformers' own
    ``model(..., labels=...).loss``: in fp32 to float error, in bf16 (the GPU's dtype, forced)
    to bf16's."""
    from peft import get_peft_model

    from lora_assets.training.text import collate, response_loss

    base = tiny_base if dtype == "fp32" else request.getfixturevalue("bf16_base")
    examples = examples_from(build_examples(MAIL, synthetic_tables["user-000"]), "train")[:6]
    batch = collate([tokenize_example(base.tokenizer, ex, 128) for ex in examples], base.tokenizer.pad_token_id)
    model = get_peft_model(base.model, MAIL.lora.to_peft())
    try:
        torch.manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: move it so A's gradients are not zero too
                torch.nn.init.normal_(param, std=0.02)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]

        def grads(loss_of) -> list[torch.Tensor]:
            model.zero_grad()
            loss_of().backward()
            return [p.grad.detach().clone().float() for p in lora]

        ours = grads(lambda: response_loss(model, batch))
        theirs = grads(lambda: model(**batch).loss)  # the batch carries its labels
    finally:
        base.model = model.unload()
    assert all(t.abs().sum() > 0 for t in theirs), "every LoRA weight has a gradient to compare"
    ours_flat, theirs_flat = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in theirs])
    relative = float((ours_flat - theirs_flat).norm() / theirs_flat.norm())
    assert relative < (1e-5 if dtype == "fp32" else 5e-3), relative  # bf16: 9e-4 here; a 1 % error is 1e-2


def test_the_heads_transposed_copy_follows_its_weight_when_it_changes_or_moves():
    """The copy the head's backward uses is remade when the weight is changed in place, replaced
    or cast, so a gradient never comes from a stale weight."""
    from lora_assets.training.text import head_logits

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32, bias=False).requires_grad_(False)
    hidden = torch.randn(5, 8)

    def agrees() -> bool:
        x = hidden.to(head.weight.dtype).detach().requires_grad_(True)
        ours, = torch.autograd.grad(head_logits(head, x).float().sum(), x)
        theirs, = torch.autograd.grad(head(x).float().sum(), x)
        return torch.allclose(ours.float(), theirs.float(), rtol=1e-2, atol=1e-3)

    assert agrees()
    with torch.no_grad():
        head.weight.mul_(3.0)  # changed in place
    assert agrees()
    head.weight = torch.nn.Parameter(torch.randn(32, 8), requires_grad=False)  # replaced
    assert agrees()
    head.to(torch.bfloat16)  # cast
    assert agrees()
