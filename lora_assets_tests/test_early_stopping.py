"""Budgets chosen by validation: a slice of the training examples picks the step an adapter is
kept at, on the sequential loop and in fused groups alike."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from lora_assets.adapters import INCREMENTAL, TrainingPlan, job_for
from lora_assets.lora_spec import StepBudget
from lora_assets.modes import MODES, build_examples
from lora_assets.training import TrainJob, train_adapters
from lora_assets.training.core import evaluate_adapter, read_adapter_metadata
from lora_assets.training.early_stopping import EarlyStopping

MAIL = MODES["mail_reply"]
# Short scores so a tiny model at a high rate overfits inside the test's budget; the best step
# alone is kept (checkpoint averaging and the refit on every example have their own tests below).
BUDGET = StepBudget(first_kept=6, max_steps=60, eval_every=3, patience=2, average=False, refit=False)


def _job(tables, user, out, **kw):
    job = job_for(MAIL, user, build_examples(MAIL, tables[user]), out)
    return replace(job, **{"budget": BUDGET, "learning_rate": 3e-2, **kw})


@pytest.fixture(scope="module")
def stopped(tiny_base, synthetic_tables, tmp_path_factory):
    out = tmp_path_factory.mktemp("early")
    job = _job(synthetic_tables, "user-000", out / "seq")
    return job, train_adapters([job], tiny_base, progress=None, fusion="sequential")[0]


def test_a_full_training_sets_aside_a_validation_slice_of_its_training_examples(synthetic_tables, tmp_path):
    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    job = job_for(MAIL, "user-000", dataset, tmp_path)
    train_ids, validation_ids = {e.id for e in job.train}, {e.id for e in job.validation}
    eval_ids = set(dataset.loc[dataset.split == "eval", "example_id"])
    assert job.early_stopping and validation_ids
    assert not validation_ids & train_ids and not validation_ids & eval_ids
    assert train_ids | validation_ids == set(dataset.loc[dataset.split == "train", "example_id"])
    assert len(validation_ids) == min(32, round(0.15 * (len(train_ids) + len(validation_ids))))
    assert job.metadata["validation_examples"] == len(validation_ids)
    fixed = job_for(MAIL, "user-000", dataset, tmp_path, steps=30)
    assert not fixed.validation and not fixed.early_stopping, "a fixed step count trains on every example"


def test_a_user_too_small_for_a_slice_trains_the_formulas_30_steps_and_a_sliced_one_may_keep_step_10(
    synthetic_tables, tmp_path
):
    """The two floors of the default budget: with nothing to tell when it stops improving, a
    small user trains at least ``min_steps``; with a slice, validation may keep ``first_kept``."""
    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    sliced = job_for(MAIL, "user-000", dataset, tmp_path)
    assert sliced.early_stopping and sliced.steps == MAIL.budget.max_steps
    scored = [s for s in range(1, sliced.steps + 1) if sliced.budget.scored(s, sliced.steps)]
    assert scored[:3] == [10, 20, 30]

    train = dataset[dataset.split == "train"]
    small = pd.concat([train.head(20), dataset[dataset.split == "eval"]])  # 20 x 15 % = 3: no slice of 4
    unsliced = job_for(MAIL, "user-000", small, tmp_path)
    assert not unsliced.validation and not unsliced.early_stopping
    assert unsliced.steps == 30, "2 epochs of 20 examples is 5 steps: the floor holds"


def test_a_full_trainings_rate_rises_with_the_users_examples_and_from_60_two_epochs_at_the_maximum_rate_decide(
        synthetic_tables, tmp_path):
    """Below ``validate_below`` (60) training examples a slice chooses the step at a rate rising
    with the examples; from 60 on every example trains for 2 epochs at the maximum rate (what
    did better on real writing for those users); an update keeps its own rate."""
    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    train = dataset[dataset.split == "train"]

    def sized(n: int) -> pd.DataFrame:  # n training examples: the user's, repeated under new ids
        rows = pd.concat([train] * (n // len(train) + 1)).head(n).copy()
        rows["example_id"] = [f"mail-{i:04d}" for i in range(n)]
        return pd.concat([rows, dataset[dataset.split == "eval"]], ignore_index=True)

    rate = MAIL.learning_rate
    small, medium, last, large = (job_for(MAIL, "u", sized(n), tmp_path / str(n)) for n in (20, 55, 59, 100))
    assert small.learning_rate == rate.base == 3e-4, "a small user: the rate that does not overfit it"
    assert medium.early_stopping and rate.base < medium.learning_rate < rate.maximum
    assert medium.learning_rate == pytest.approx(3e-4 * len(medium.train) / 45), "in proportion to its examples"
    assert last.early_stopping and MAIL.budget.validate_below == 60
    assert not large.validation and not large.early_stopping and len(large.train) == 100
    assert large.learning_rate == rate.maximum == 1e-3
    assert large.steps == 25, "2 epochs of 100 examples in batches of 8: no floor of 30 from 60 examples on"
    update = job_for(MAIL, "u", sized(600), tmp_path / "inc", plan=TrainingPlan(INCREMENTAL, "test", ("mail-0001",)))
    assert update.learning_rate == MAIL.update.learning_rate, "an incremental update's rate is its policy's"


def test_a_deployments_step_ceiling_caps_validation_and_the_formula_and_a_bad_one_is_named(
        synthetic_tables, tmp_path):
    """``LORA_ASSETS_MAX_TRAIN_STEPS``: the GPU time of one adapter bounded, the budget kept
    (the bf16 daemon test trains under a ceiling of 45 end to end)."""
    from lora_assets.settings import Settings

    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    capped = Settings.from_env({"LORA_ASSETS_MAX_TRAIN_STEPS": "15", "LORA_ASSETS_HOME": str(tmp_path)})
    sliced = job_for(MAIL, "user-000", dataset, tmp_path / "a", **capped.step_budget)
    assert sliced.early_stopping and sliced.steps == 15 < MAIL.budget.max_steps
    assert [s for s in range(1, 16) if sliced.budget.scored(s, sliced.steps)] == [10, 15], "the ceiling's step is scored"
    tight = job_for(MAIL, "user-000", dataset, tmp_path / "b", step_ceiling=5)
    assert tight.budget.first_kept == 5 and tight.budget.scored(5, tight.steps), "below first_kept: the ceiling is kept"
    train = dataset[dataset.split == "train"]
    unsliced = job_for(MAIL, "user-000", pd.concat([train.head(20), dataset[dataset.split == "eval"]]), tmp_path / "c",
                       **capped.step_budget)
    assert not unsliced.early_stopping and unsliced.steps == 15, "the formula's floor of 30 stops at the ceiling too"
    assert job_for(MAIL, "user-000", dataset, tmp_path / "d", step_ceiling=500).budget == MAIL.budget
    with pytest.raises(ValueError, match="^LORA_ASSETS_MAX_TRAIN_STEPS must be >= 0, not -1$"):
        Settings.from_env({"LORA_ASSETS_MAX_TRAIN_STEPS": "-1", "LORA_ASSETS_HOME": str(tmp_path)})


def test_dpo_not_tuned_on_real_writing_keeps_a_validation_slice_at_every_size(tmp_path):
    from lora_assets.data.synthetic import generate_user

    tone = MODES["tone_rewrite"]
    pairs = build_examples(tone, {"feedback": generate_user("u", scale=3)["feedback"]})
    job = job_for(tone, "u", pairs, tmp_path)
    assert len(job.train) + len(job.validation) >= MAIL.budget.validate_below
    assert job.early_stopping and job.validation, "a large DPO user still chooses its step on a slice"


def test_early_stopping_keeps_the_best_scored_step_of_the_validation_curve(tiny_base, stopped):
    job, result = stopped
    steps, losses = zip(*result.validation_curve)
    assert steps[0] == BUDGET.first_kept and all(b - a == BUDGET.eval_every for a, b in zip(steps, steps[1:]))
    assert result.best_step == steps[losses.index(min(losses))]
    assert result.steps < BUDGET.max_steps, "validation stopped improving: training stopped"
    assert result.steps == steps[-1], "it stopped at a score"
    earlier = min(losses[: -BUDGET.patience])
    assert all(loss >= earlier - BUDGET.min_improvement for loss in losses[-BUDGET.patience:]), \
        "the last `patience` scores made no progress"
    assert len(result.loss_curve) == result.steps
    kept = evaluate_adapter(tiny_base, job.output_dir, job.validation)
    assert kept == pytest.approx(min(losses), abs=1e-4), "the saved adapter is the best step's, not the last"


def test_a_fused_group_stops_each_job_at_its_own_best_step(tiny_base, synthetic_tables, tmp_path):
    # One job learns steadily to the end of a 30-step budget; the other, at a rate that
    # overfits at once, stops early. Fused and sequential training differ by reduction order,
    # which a chaotic (high-rate) trajectory amplifies, so the steady job is the one compared.
    steady = dict(learning_rate=1e-2, budget=replace(BUDGET, max_steps=30))
    jobs = [_job(synthetic_tables, "user-000", tmp_path / "a", **steady),
            _job(synthetic_tables, "user-001", tmp_path / "b")]
    fused = train_adapters(jobs, tiny_base, progress=None, fusion="batched")
    alone = train_adapters([replace(jobs[0], output_dir=tmp_path / "seq")], tiny_base, progress=None,
                           fusion="sequential")[0]
    assert fused[0].fused_with == 2
    assert fused[1].steps < fused[0].steps == 30, "the overfitting job stopped; the other trained on"
    assert [s for s, _ in fused[0].validation_curve] == [s for s, _ in alone.validation_curve]
    for (_, f), (_, a) in zip(fused[0].validation_curve, alone.validation_curve):
        assert f == pytest.approx(a, abs=1e-2), "the other job stopping leaves this one's training as it was"
    assert fused[1].best_step < fused[1].steps, "the stopped job keeps its best step, not its last"
    for job, result in zip(jobs, fused):
        steps, losses = zip(*result.validation_curve)
        assert result.best_step == steps[losses.index(min(losses))]
        kept = evaluate_adapter(tiny_base, job.output_dir, job.validation)
        assert kept == pytest.approx(min(losses), abs=1e-3)


def _scripted(scores: list[float], average: bool) -> tuple[EarlyStopping, list[float]]:
    """Early stopping driven by a scripted validation curve. Step s's "weights" are the number
    s * s; after training, validation scores weights 0.1 plus their distance from ``AVERAGED``."""
    budget = StepBudget(first_kept=1, max_steps=len(scores), eval_every=1, patience=9, average=average, refit=False)
    job = TrainJob("u/mail_reply", train=["x"], validation=["y"], output_dir=Path("unused"), max_steps=None, budget=budget)
    weights, curve = [0.0], iter(scores)

    def validate() -> float:
        return next(curve, None) or 0.1 + abs(weights[0] - AVERAGED)

    stopping = EarlyStopping(job, validate, snapshot=lambda: list(weights), restore=lambda w: weights.__setitem__(0, w[0]))
    for step in range(1, len(scores) + 1):
        weights[0] = float(step * step)
        stopping.after_step(step)
    return stopping, weights


AVERAGED = (4 + 9 + 16) / 3  # steps 2, 3 and 4


def test_checkpoint_averaging_keeps_the_mean_of_the_best_step_and_its_neighbours_when_it_scores_better():
    tone = MODES["tone_rewrite"].budget
    assert tone.average and not tone.refit, "a mode that keeps its validation pass's adapter averages by default"
    stopping, weights = _scripted([0.9, 0.6, 0.5, 0.7, 0.8], average=True)
    stopping.finish()
    assert stopping.best_step == 3 and stopping.averaged
    assert weights[0] == pytest.approx(AVERAGED), "the best scored step and the scored steps either side"

    stopping, weights = _scripted([0.9, 0.6, 0.05, 0.7, 0.8], average=True)
    stopping.finish()
    assert not stopping.averaged and weights[0] == 9, "the mean scored worse than the best step: the best is kept"

    stopping, weights = _scripted([0.9, 0.8, 0.7, 0.6, 0.5], average=True)
    stopping.finish()
    assert stopping.best_step == 5 and weights[0] == 25, "the last step, averaged with step 4 only, scored worse"

    stopping, weights = _scripted([0.9, 0.6, 0.5, 0.7, 0.8], average=False)
    stopping.finish()
    assert not stopping.averaged and weights[0] == 9, "off when the budget says so"


@pytest.mark.parametrize("fusion", ["sequential", "batched"])
def test_an_averaged_adapter_is_saved_and_recorded_when_the_mean_beats_the_best_step(
        tiny_base, synthetic_tables, stopped, tmp_path, fusion):
    # Whether the mean scores better depends on each trajectory, so four are trained (two users,
    # two overfitting rates): each keeps what its slice scored best and records which it kept,
    # and at least one keeps a mean.
    job, plain = stopped
    averaging = replace(BUDGET, average=True)
    jobs = [replace(job, output_dir=tmp_path / "avg", budget=averaging),
            _job(synthetic_tables, "user-000", tmp_path / "fast0", budget=averaging, learning_rate=1e-1),
            _job(synthetic_tables, "user-001", tmp_path / "slow1", budget=averaging),
            _job(synthetic_tables, "user-001", tmp_path / "fast1", budget=averaging, learning_rate=1e-1)]
    results = train_adapters(jobs, tiny_base, progress=None, fusion=fusion)
    if fusion == "sequential":
        assert results[0].validation_curve == plain.validation_curve, "averaging changes nothing until the end"
    for job, result in zip(jobs, results):
        best = min(loss for _, loss in result.validation_curve)
        if result.averaged:
            assert result.validation_loss < best, f"{job.name}: the mean scored better than the best step"
        else:
            assert result.validation_loss == best, f"{job.name}: the best step, the mean scored worse"
        kept = evaluate_adapter(tiny_base, job.output_dir, job.validation)
        tolerance = 1e-4 if fusion == "sequential" else 1e-3  # a fused group scores in padded batches
        assert kept == pytest.approx(result.validation_loss, abs=tolerance), f"{job.name}: what was saved is what scored"
        metrics = read_adapter_metadata(job.output_dir)["metrics"]
        assert (metrics["averaged"], metrics["validation_loss"]) == (result.averaged, result.validation_loss)
    assert any(r.averaged for r in results), "a noisy trajectory's mean scores better somewhere"


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("fusion,dtype", [("sequential", "fp32"), ("batched", "fp32"), ("batched", "bf16")])
def test_a_refit_trains_every_example_for_the_step_validation_chose_and_only_it_is_kept(
        request, tiny_base, synthetic_tables, stopped, tmp_path, fusion, dtype):
    """``StepBudget.refit`` (the default below 60 examples): the validation pass only chooses the
    steps; a fresh adapter of every example, the slice's too, trains that many and is the one
    written, recorded and handed to ``on_saved``, with the job the caller gave. On a GPU worker
    the refits of a batch train as one fused group in bf16 (forced here)."""
    base = tiny_base if dtype == "fp32" else request.getfixturevalue("bf16_base")
    plain_job, plain = stopped  # the same job without refit: its validation pass
    refit = replace(BUDGET, refit=True, average=True)  # averaging is for a pass's own adapter: not done
    jobs = [replace(plain_job, output_dir=tmp_path / "a" / "mail_reply", budget=refit),
            _job(synthetic_tables, "user-001", tmp_path / "b" / "mail_reply", budget=refit)]
    saved = []
    results = train_adapters(jobs, base, progress=None, fusion=fusion, on_saved=lambda j, r: saved.append((j, r)))
    assert len(saved) == 2 and {id(j): r for j, r in saved} == {id(j): r for j, r in zip(jobs, results)}, \
        "told once per job, of the refit, with the job it was given"
    for job, result in zip(jobs, results):
        assert result.refit and result.steps == result.best_step < result.validation_steps
        assert result.best_step == min(result.validation_curve, key=lambda p: p[1])[0]
        assert not result.averaged and result.validation_loss == min(loss for _, loss in result.validation_curve)
        assert sorted(p.name for p in job.output_dir.parent.iterdir()) == ["mail_reply"], "nothing of the choosing pass written"
        metrics = read_adapter_metadata(job.output_dir)["metrics"]
        assert metrics["refit"] and metrics["best_step"] == result.best_step and metrics["steps"] == result.best_step
        assert None not in (result.base_eval_loss, result.adapter_eval_loss), "the gate's held-out set scores the refit"
    if fusion == "sequential":
        job, result = jobs[0], results[0]
        assert result.validation_curve == plain.validation_curve and result.best_step == plain.best_step
        everything = replace(job, train=[*job.train, *job.validation], validation=(), max_steps=plain.best_step,
                             output_dir=tmp_path / "by-hand")
        train_adapters([everything], tiny_base, progress=None, fusion="sequential")
        refit, by_hand = _tensors(job.output_dir), _tensors(everything.output_dir)
        assert refit.keys() == by_hand.keys()
        assert all(refit[k].equal(by_hand[k]) for k in refit), "the kept adapter is every example for the chosen steps"
        assert not _tensors_equal_to_validation_pass(tiny_base, job, plain)


def _tensors_equal_to_validation_pass(tiny_base, job, plain) -> bool:
    """Whether the refit kept the validation pass's own adapter (it must not)."""
    return evaluate_adapter(tiny_base, job.output_dir, job.validation) == pytest.approx(plain.validation_loss, abs=1e-6)


def test_a_full_training_of_the_product_refits_below_60_examples_and_records_the_slices_examples_as_trained(
        synthetic_tables, tmp_path):
    dataset = build_examples(MAIL, synthetic_tables["user-000"])
    job = job_for(MAIL, "user-000", dataset, tmp_path)
    assert MAIL.budget.refit and job.refits and len(job.train) + len(job.validation) < MAIL.budget.validate_below
    assert job.metadata["examples_trained"] == len(job.train) + len(job.validation)
    assert not MODES["tone_rewrite"].budget.refit, "DPO (not measured on real writing) keeps its pass's adapter"
