"""DPO for the tone_rewrite mode: the loss, pair validation, and learning from feedback."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from lora_assets.adapters import job_for
from lora_assets.modes import MODES, build_examples
from lora_assets.objective import DPO
from lora_assets.training import (
    InvalidTrainingData,
    TrainJob,
    read_adapter_metadata,
    train_adapters,
)
from lora_assets.training.dpo import (
    PreferencePair,
    dpo_loss,
    pair_batch,
    sequence_logps,
)

TONE = MODES["tone_rewrite"]


def test_dpo_loss_matches_a_hand_computed_value():
    policy_chosen, policy_rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0])
    ref_chosen, ref_rejected = torch.tensor([-1.5, -2.0]), torch.tensor([-1.5, -2.0])
    loss, margins = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    # pair 1: 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1;  pair 2: 0.1 * ((-3 + 2) - (-1 + 2)) = -0.2
    assert margins.tolist() == pytest.approx([0.1, -0.2])
    expected = (math.log1p(math.exp(-0.1)) + math.log1p(math.exp(0.2))) / 2  # -log sigmoid(m)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert dpo_loss(*(torch.zeros(1),) * 4, beta=0.1)[0].item() == pytest.approx(math.log(2))


def test_sequence_logps_sum_response_token_logprobs(tiny_base):
    pair = PreferencePair(prompt="Say hi", chosen="Hey there!", rejected="Go away.")
    batch = pair_batch(tiny_base.tokenizer, [pair], max_length=64)
    with torch.no_grad():
        ours = sequence_logps(tiny_base.model, batch)
        logits = tiny_base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = batch["labels"][:, 1:]
    for row in range(2):
        mask = labels[row] != -100
        by_hand = logprobs[row][mask].gather(1, labels[row][mask].unsqueeze(1)).sum()
        assert ours[row].item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize(
    "pair, message",
    [
        (PreferencePair("Rewrite: hi", "Hey!!", "Hey!!", id="fb-1"), "(id=fb-1): chosen and rejected are identical"),
        (PreferencePair("Rewrite: hi", "", "Hello.", id="fb-2"), "(id=fb-2): empty chosen"),
        (PreferencePair("Rewrite: hi", "Hey!!", "  ", id="fb-3"), "(id=fb-3): empty rejected"),
        (PreferencePair("", "Hey!!", "Hello.", id="fb-4"), "(id=fb-4): empty prompt"),
    ],
)
def test_bad_pairs_are_rejected_with_a_clear_error(tiny_base, tmp_path, pair, message):
    job = TrainJob(name="alice/tone_rewrite", output_dir=tmp_path / "a", objective=DPO(),
                   train=[PreferencePair("Rewrite: hi", "Hey!!", "Hello."), pair])
    with pytest.raises(InvalidTrainingData) as err:
        train_adapters([job], tiny_base, progress=None)
    assert "alice/tone_rewrite" in str(err.value) and message in str(err.value)
    assert not (tmp_path / "a").exists()


def test_feedback_pairs_hold_edits_over_suggestions_and_accepted_over_rejected(synthetic_tables):
    df = build_examples(TONE, synthetic_tables["user-000"])
    feedback = {r["id"]: r for r in synthetic_tables["user-000"]["feedback"].to_pylist()}
    assert len(df) >= 30 and (df["split"] == "eval").sum() >= 4
    for row in df.itertuples(index=False):
        if row.example_id.endswith(":edit"):
            rec = feedback[row.example_id.split(":")[0]]
            assert (row.response, row.rejected) == (rec["edit"], rec["suggestion"])
        else:
            acc, rej = (feedback[i] for i in row.example_id.split(">"))
            assert (acc["outcome"], rej["outcome"]) == ("accepted", "rejected")
            assert acc["prompt"] == rej["prompt"] == row.prompt


def test_dpo_training_improves_held_out_preference_accuracy_and_margin(tiny_base, synthetic_tables, tmp_path):
    df = build_examples(TONE, synthetic_tables["user-000"])
    job = replace(job_for(TONE, "user-000", df, tmp_path / "tone", steps=25), learning_rate=1e-2)
    (result,) = train_adapters([job], tiny_base, progress=None)
    m = result.extra_metrics
    # A fresh LoRA is the reference itself: margin 0, loss ln 2, nothing preferred yet.
    assert m["reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert result.base_eval_loss == pytest.approx(math.log(2), abs=1e-6)
    assert m["preference_accuracy_after"] > m["preference_accuracy_before"]
    assert m["preference_accuracy_after"] >= 0.75
    assert m["reward_margin_after"] > m["reward_margin_before"] + 0.1
    assert result.adapter_eval_loss < result.base_eval_loss
    meta = read_adapter_metadata(job.output_dir)
    assert meta["metrics"]["extra_metrics"]["preference_accuracy_after"] == m["preference_accuracy_after"]

    # Warm start from that adapter: "before" is now the previous adapter's preferences.
    again = replace(job, output_dir=tmp_path / "tone2", warm_start_from=job.output_dir, max_steps=2)
    (second,) = train_adapters([again], tiny_base, progress=None)
    assert second.extra_metrics["reward_margin_before"] == pytest.approx(m["reward_margin_after"], rel=1e-4)


def test_tone_rewrite_trains_and_publishes_through_dagster(home, tiny_base, synthetic_tables, tmp_path):
    from dagster import instance_for_test, materialize

    from lora_assets.data.user_store import UserStore
    from lora_assets.drive.publish import read_current
    from lora_assets.orchestration.assets import (
        adapter_key,
        all_assets,
        dataset_key,
        published_key,
        source_key,
    )
    from lora_assets.orchestration.resources import LoraAssetsHome

    (tmp_path / "base_models").symlink_to(home / "base_models", target_is_directory=True)
    UserStore(tmp_path / "users").write("user-000", "feedback", synthetic_tables["user-000"]["feedback"])
    res = LoraAssetsHome(home=str(tmp_path), train_steps=10, gate_margin=0.0)
    with instance_for_test() as instance:
        res.state().register(["user-000"])
        instance.add_dynamic_partitions("base_models", ["tiny-llama"])
        assert materialize(all_assets(), selection=[source_key("feedback"), dataset_key("tone_rewrite")],
                           instance=instance, resources={"lora_home": res}).success
        result = materialize(all_assets(), selection=[adapter_key("tone_rewrite"), published_key("tone_rewrite")],
                             partition_key="tiny-llama", instance=instance, resources={"lora_home": res})
        assert result.success
        (mat,) = result.asset_materializations_for_node("tone_rewrite__adapter")
        assert mat.metadata["trained"].value == 1
        meta = res.state().training("tiny-llama", "user-000", "tone_rewrite")
        assert meta["preference_accuracy_after"] > meta["preference_accuracy_before"]
        assert meta["reward_margin_after"] > meta["reward_margin_before"]
        assert read_current(res.drive(), "user-000", "tiny-llama", "tone_rewrite") is not None
