"""Learning from each change: small changes update the published adapter, deletions and new
base models retrain from scratch, DPO keeps what earlier feedback taught."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
from dagster import instance_for_test

from lora_assets.adapters import FULL, INCREMENTAL, plan_update
from lora_assets.data.user_store import write_user
from lora_assets.datasets import read_dataset
from lora_assets.lora_spec import StepBudget
from lora_assets.modes import MODES
from lora_assets.orchestration.resources import LoraAssetsHome
from lora_assets.orchestration.runs import register_users, run_adapter_batch, run_dataset_batch
from lora_assets.training import read_adapter_metadata, register_base_model

MAIL = MODES["mail_reply"]


@pytest.fixture
def env(tmp_path, home, tiny_base, synthetic_tables):
    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    res = LoraAssetsHome(home=str(tmp_path), gate_margin=0.0, gate_confidence=1.0)
    tables = dict(synthetic_tables["user-000"])
    mail = tables["mail"].to_pylist()
    tables["mail"] = pa.Table.from_pylist(mail[:-3], schema=tables["mail"].schema)  # 3 mails arrive later
    write_user(res.store(), "alice", tables)
    with instance_for_test() as instance:
        register_users(res.settings(), ["alice"])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        yield instance, res, mail[-3:]


def _train(instance, res, base="tiny-llama", mode="mail_reply", sources=("mail",)) -> dict:
    assert run_dataset_batch(instance, {"alice": list(sources)}, res).success
    assert run_adapter_batch(instance, base, [("alice", mode)], res).success
    return res.state().training(base, "alice", mode)  # how it was trained, as the state table keeps it


def test_a_small_change_updates_the_published_adapter_warm_and_a_delete_retrains_from_scratch(env):
    instance, res, later = env
    first = _train(instance, res)
    assert (first["training"], first["training_reason"]) == (FULL, "first training")

    res.store().write("alice", "mail", pa.Table.from_pylist(later[:1], schema=res.store().read("alice", "mail").schema))
    update = _train(instance, res)
    assert update["training"] == INCREMENTAL and update["incremental_streak"] == 1
    assert update["warm_start_version"]  # continued from what the user's devices run
    assert "new or changed" in update["training_reason"]
    assert update["examples_trained"] < first["examples_trained"]  # new ones plus a replay sample
    folder = res.path / "adapters" / "tiny-llama" / "alice" / "mail_reply"
    assert read_adapter_metadata(folder)["warm_start_from"].endswith(update["warm_start_version"])

    # A record it was trained on is deleted: retrained from scratch without it, never updated.
    trained_on = sorted(read_adapter_metadata(folder)["trained_examples"])
    res.store().write("alice", "mail", deletes=[trained_on[0]])
    deleted = _train(instance, res)
    assert deleted["training"] == FULL and "are gone: retrained without them" in deleted["training_reason"]
    assert read_adapter_metadata(folder)["warm_start_from"] is None
    assert trained_on[0] not in read_adapter_metadata(folder)["trained_examples"]


def test_an_update_that_fails_the_gate_is_retrained_in_full_in_the_same_run(env):
    instance, res, later = env
    _train(instance, res)
    res.store().write("alice", "mail", pa.Table.from_pylist(later[:1], schema=res.store().read("alice", "mail").schema))
    assert run_dataset_batch(instance, {"alice": ["mail", "contacts"]}, res).success
    # A margin no retrain can meet (100 nats better than the base): the update fails ...
    picky = LoraAssetsHome(home=res.home, gate_margin=100.0)
    assert not run_adapter_batch(instance, "tiny-llama", [("alice", "mail_reply")], picky).success
    meta = res.state().training("tiny-llama", "alice", "mail_reply")
    # ... so the same run trained from scratch and gated that one instead.
    assert meta["training"] == FULL
    assert meta["training_reason"].startswith("the incremental update failed the eval gate")


def test_a_new_base_model_revision_retrains_in_full(env, tmp_path, home):
    instance, res, later = env
    copy = tmp_path / "tiny-x"
    shutil.copytree(home / "base_models" / "tiny-llama", copy)
    register_base_model("tiny-x", copy, res.path)
    instance.add_dynamic_partitions("base_models", ["tiny-x"])
    assert _train(instance, res, base="tiny-x")["training"] == FULL

    (copy / "config.json").write_text((copy / "config.json").read_text().replace("}", ', "note": "v2"}', 1))
    res.store().write("alice", "mail", pa.Table.from_pylist(later[:1], schema=res.store().read("alice", "mail").schema))
    again = _train(instance, res, base="tiny-x")
    assert (again["training"], again["training_reason"]) == (FULL, "the base model changed")


def test_updates_stop_after_a_streak_and_for_large_changes(synthetic_tables):
    from lora_assets.adapters import example_fingerprints
    from lora_assets.modes import build_examples

    df = build_examples(MAIL, synthetic_tables["user-000"])
    trained = example_fingerprints(df)
    published = {"base_model_revision": "r1", "lora": {"r": 16, "alpha": 32, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, "trained_examples": trained,
                 "incremental_streak": 0, "version": "v1"}
    assert plan_update(MAIL, df, published, "r1").path == INCREMENTAL  # nothing new: a short refresh
    assert plan_update(MAIL, df, {**published, "incremental_streak": 3}, "r1").reason == "3 incremental updates in a row"
    most = dict(list(trained.items())[: len(trained) // 2])
    assert plan_update(MAIL, df, {**published, "trained_examples": {**most, **{k: "x" for k in list(trained)[len(most):]}}},
                       "r1").reason.startswith("large change")
    assert plan_update(MAIL, df, {**published, "lora": {**published["lora"], "r": 8}}, "r1").path == FULL


def test_the_step_budget_follows_the_data():
    budget = StepBudget(epochs=2.0, min_steps=10, max_steps=120)
    assert [budget.steps(n, 8) for n in (20, 200, 1000)] == [10, 50, 120]


def test_dpo_keeps_what_earlier_feedback_taught(env, synthetic_tables):
    """Two rounds of feedback: the second warm-starts from the first and ends at least as good
    on the held-out pairs."""
    instance, res, _later = env
    feedback = synthetic_tables["user-000"]["feedback"].to_pylist()
    schema = synthetic_tables["user-000"]["feedback"].schema
    strong = LoraAssetsHome(home=res.home, gate_margin=0.0, gate_confidence=1.0, train_steps=25)
    later = feedback[len(feedback) * 19 // 20 :]
    res.store().write("alice", "feedback", deletes=[r["id"] for r in later])  # the last 5 % arrive later
    round1 = _train(instance, strong, mode="tone_rewrite", sources=("feedback",))
    res.store().write("alice", "feedback", pa.Table.from_pylist(later, schema=schema))
    round2 = _train(instance, strong, mode="tone_rewrite", sources=("feedback",))
    assert round1["training"] == FULL and round1["preference_accuracy_after"] > round1["preference_accuracy_before"]
    assert round2["training"] == INCREMENTAL and round2["warm_start_version"], round2["training_reason"]
    # On round 2's held-out pairs: "before" is where round 2 started, the round-1 adapter.
    assert round2["preference_accuracy_before"] > 0.5, "round 2 starts from what round 1 learned"
    assert round2["preference_accuracy_after"] >= round2["preference_accuracy_before"]
    df, _ = read_dataset(res.datasets(), "alice", "tone_rewrite")
    assert (df["split"] == "eval").sum() >= 4
